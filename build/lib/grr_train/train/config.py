"""Training settings: the typed `TrainConfig`, the paper's two recipes, and how overrides apply.

Every setting has one flat name, so `--set name=value` reaches all of them and a run's
`config.json` records every value it ran with. Overrides apply in this order: recipe
defaults, then `--config FILE` (settings in JSON, TOML or YAML: flat, or under `train` as in a
run's config.json, which serves as a template), then `--set`, then the few
dedicated command-line flags (`--data`, `--preset`, `--max-steps`, fine-tuning's DATASET
and `--from`). A default derived from the command line (fine-tuning's data/DATASET/shards)
applies only when none of these gave the setting.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields, replace

from grr_data.infra.names import did_you_mean
from grr_train.runs.wandb_sink import check_available as check_wandb

RECIPES = ("pretrain", "finetune")
PRECISIONS = ("auto", "fp32", "bf16")
LOADERS = ("auto", "dali", "cpu")
# auto: per-block compile on CUDA (measured fastest on the H200, docs/LOG.md; `regions` is not measured on a
# GPU yet), eager elsewhere.
COMPILE_MODES = ("auto", "off", "blocks", "regions", "model")
# Speed levers that change nothing but speed and rounding (grr_train/runtime/parallel.py): auto turns on, on
# CUDA, those a GPU session measured to help (none yet: MEASURED_ON_CUDA), and is off on the CPU, so the
# CPU's fixed-seed curve keeps its rounding.
SPEED_SWITCHES = ("auto", "on", "off")
# How compiled graphs draw dropout's random numbers (grr_train/runtime/parallel.py, set_inductor_random).
INDUCTOR_RANDOM = ("default", "fallback", "align_eager")
# ddp: every process holds the whole model (the paper's 394M); fsdp: FSDP2 shards parameters,
# gradients and optimizer state over the processes (grr_train/runtime/parallel.py), for 1-2B models.
PARALLELISMS = ("ddp", "fsdp")

# trim_text_padding's refusal, where compile is set (here) or resolves on the device (run_checks):
# per-block compiles take the trimmed lengths in buckets of 16 (4 shapes); a whole-model graph
# cannot hold trimming's host read.
TRIM_NEEDS_EAGER = ("trim_text_padding=true reads each micro-batch's caption length on the host, which a "
                    "whole-model graph cannot hold, but compile is {compile!r}: set compile=blocks, regions or "
                    "off, or trim_text_padding=false")

# Settings a resumed run may change: they do not alter what the run computes.
RESUMABLE_KEYS = frozenset(
    {"data", "max_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "loader", "compile",
     "val_every", "tensorboard", "activation_checkpointing", "break_lock", "allow_other_tokenizer",
     "max_skipped_fraction", "trim_text_padding", "log_every", "log_every_s",
     "wandb_project", "wandb_entity", "wandb_mode",
     "aligned_widths", "fused_caption_loss", "clip_in_optimizer", "inductor_random"}
)


@dataclass
class TrainConfig:
    recipe: str = "pretrain"
    preset: str = "grr-coca"
    data: str = "data/cc12m/shards"
    dataset: str | None = None  # fine-tuning: the dataset name given on the command line
    init_from: str | None = None  # fine-tuning: the run or checkpoint the weights come from
    seed: int = 0

    # Batch. The contrastive loss sees `contrastive_batch_size` pairs per micro-step whatever the
    # number of processes (the paper's 48 per GPU x 4 GPUs): each process's micro-batch is
    # contrastive_batch_size / world_size, and accumulation = global / contrastive_batch_size.
    # `per_device_batch_size`, when set, overrides that micro-batch (the contrastive batch is then
    # per_device_batch_size x world_size). grr_train.train.plan.BatchPlan derives them, once per run.
    global_batch_size: int = 768
    contrastive_batch_size: int = 192
    per_device_batch_size: int | None = None
    epochs: int = 21
    max_steps: int | None = None  # optimizer steps in total, across resumes

    # Loss weights (eq. 6) and model dropout.
    lambda_con: float = 2.0
    lambda_cap: float = 1.0
    dropout: float = 0.15

    # AdamW and the learning-rate schedule (see grr_train/train/schedule.py).
    lr_max: float = 1e-4
    lr_min: float = 1e-6
    warmup_steps: int = 2000
    # Cosine cycle length in optimizer steps; none = one epoch, the paper's SGDR. On a small set
    # (epochs of tens of steps) per-epoch restarts keep the rate high: set it to max_steps.
    lr_cycle_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.001
    grad_clip: float = 1.0

    # Early stopping with soft reset (see grr_train/train/early_stop.py); fine-tuning only by default.
    early_stop: bool = False
    patience_per_level: int = 3
    num_lr_levels: int = 3
    lr_reduction: float = 100.0

    # Validation: at every epoch end, and every `val_every` optimizer steps when > 0.
    val_every: int = 0
    val_split: str = "val"
    val_batch_size: int = 48
    # 192 = 48 per GPU x 4 GPUs: the contrastive batch of the paper's training setup.
    val_contrastive_batch_size: int = 192

    # Checkpoints.
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3

    # Runtime.
    loader: str = "auto"
    # How long a collective waits for the other processes before the run fails (None: torch's
    # default, 10 minutes on NCCL); raise it when one rank's saves or validation are slow.
    process_group_timeout_minutes: float | None = None
    num_workers: int | None = None  # CPU loader workers; None: this process's share of the cores, less one
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: str = "auto"  # one of COMPILE_MODES; a compile failure falls back to eager with a warning
    # Recompute each transformer block in backward instead of keeping its activations: for a
    # micro-batch that does not fit otherwise (README: which cards need it). Same results.
    activation_checkpointing: bool = False
    # Run the text decoders only over the caption positions a micro-batch uses (CoCa.forward's
    # trim_padding): same losses to float rounding, faster on short captions. It reads each
    # micro-batch's longest caption on the host; compiled, lengths go up to a multiple of 16 (a few
    # shapes), eager they are exact. Not with compile=model (the host read would split its graph).
    trim_text_padding: bool = False
    # Speed levers (grr_train/runtime/parallel.py, step.py): the same maths, other rounding; SPEED_SWITCHES.
    aligned_widths: str = "auto"  # GEGLU hidden and the fused loss's vocabulary padded to multiples of 32
    fused_caption_loss: str = "auto"  # LM head and caption loss in chunks, no full logits (model/head_loss.py)
    clip_in_optimizer: str = "auto"  # gradient clipping as fused AdamW's grad_scale: no pass over the gradients
    inductor_random: str = "default"  # one of INDUCTOR_RANDOM
    # Contrastive batches per micro-batch: 2 runs two of 192 as one micro-batch of 384 (each its own
    # contrastive loss, the same maths as two micro-batches; larger GEMMs where memory allows).
    micro_batch_groups: int = 1
    parallelism: str = "ddp"  # one of PARALLELISMS; fsdp checkpoints are sharded (torch.distributed.checkpoint)
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradient is NaN/Inf
    # A run that skipped more than this fraction of its steps ends with an error (after saving).
    max_skipped_fraction: float = 0.05
    # Take over a run folder's lock left by a run on another host (grr_data/infra/lock.py says when).
    break_lock: bool = False
    # Accept data whose tokenizer fingerprint differs from the one the run (or --from) recorded.
    allow_other_tokenizer: bool = False
    tensorboard: bool = True
    # Where output is not a terminal (a Slurm log, nohup, a pipe) progress is plain lines, not a
    # bar: one for each of the first 3 steps, then every log_every steps or log_every_s seconds.
    log_every: int = 50
    log_every_s: float = 30.0
    # Weights & Biases (the wandb extra): on when a project is named; the run folder keeps the W&B
    # run's id, so a resumed run continues it (grr_train/runs/wandb_sink.py).
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str | None = None  # online, offline or disabled; none: W&B's default (WANDB_MODE)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training settings: {unknown_names(unknown)}")
        cfg = cls()
        for key, value in d.items():
            setattr(cfg, key, check_type(key, value))
        return cfg

    def validate(self) -> None:
        """Raise ValueError on settings that cannot work together."""
        from grr_train.model.config import PRESETS  # imported here: it brings in the model code

        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}{did_you_mean(self.preset, PRESETS)}; "
                             f"known: {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {self.loader!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}")
        if self.parallelism == "fsdp" and self.compile == "model":
            raise ValueError("compile=model does not combine with parallelism=fsdp (FSDP2 gathers weights per "
                             "block, outside a whole-model graph); use compile=blocks or auto")
        if self.trim_text_padding and self.compile == "model":
            raise ValueError(TRIM_NEEDS_EAGER.format(compile=self.compile))
        for name in ("aligned_widths", "fused_caption_loss", "clip_in_optimizer"):
            if getattr(self, name) not in SPEED_SWITCHES:
                raise ValueError(f"{name} must be one of {SPEED_SWITCHES}, got {getattr(self, name)!r}")
        if self.inductor_random not in INDUCTOR_RANDOM:
            raise ValueError(f"inductor_random must be one of {INDUCTOR_RANDOM}, got {self.inductor_random!r}")
        if self.per_device_batch_size is not None and self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be at least 1, got {self.per_device_batch_size}")
        if self.lr_cycle_steps is not None and self.lr_cycle_steps < 1:
            raise ValueError(f"lr_cycle_steps must be at least 1, got {self.lr_cycle_steps}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_wandb(self.wandb_project, self.wandb_mode)
        if self.log_every < 0 or self.log_every_s < 0:
            raise ValueError(f"log_every and log_every_s must be >= 0, got {self.log_every} and {self.log_every_s}")
        for name in ("global_batch_size", "contrastive_batch_size", "micro_batch_groups", "epochs", "val_batch_size",
                     "val_contrastive_batch_size", "checkpoint_every", "keep_checkpoints",
                     "patience_per_level", "num_lr_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(f"need 0 <= lr_min <= lr_max, got {self.lr_min} and {self.lr_max}")
        if self.recipe == "finetune" and not self.init_from:
            raise ValueError("fine-tuning needs the weights to start from (--from RUN_OR_CHECKPOINT, "
                             "or --set init_from=)")


# What each setting means, one line each, for `grr train settings`; a new TrainConfig field
# without an entry fails tests/test_train_config.py.
SETTING_HELP: dict[str, str] = {
    "recipe": "pretrain or finetune; set by the command, not changed by hand",
    "preset": "model preset to pretrain (grr model list); fine-tuning takes the model of --from",
    "data": "sharded set to train on (a folder with manifest.json, from grr data shard)",
    "dataset": "fine-tuning: the DATASET name given on the command line (recorded, not read)",
    "init_from": "fine-tuning: the pretrained run or checkpoint folder the weights come from (--from)",
    "seed": "random seed of weights, dropout and data order (each process adds its rank)",
    "global_batch_size": "samples per optimizer step, over all processes and micro-batches",
    "contrastive_batch_size": "pairs in each micro-step's contrastive loss, whatever the number of processes",
    "per_device_batch_size": "samples of one contrastive batch on each process, the micro-batch unless "
                             "micro_batch_groups > 1 (none: contrastive_batch_size / processes)",
    "epochs": "passes over the train split (fine-tuning: a cap, early stopping ends the run)",
    "max_steps": "stop after this many optimizer steps in total, across resumes (none: no limit)",
    "lambda_con": "weight of the contrastive loss (eq. 6)",
    "lambda_cap": "weight of the captioning loss (eq. 6)",
    "dropout": "dropout probability in the model",
    "lr_max": "peak learning rate (after warm-up, and at each cosine restart)",
    "lr_min": "lowest learning rate of each cosine cycle (one cycle per epoch)",
    "warmup_steps": "optimizer steps of linear warm-up to lr_max",
    "lr_cycle_steps": "optimizer steps per cosine cycle (none: one epoch, as the paper; small sets: max_steps)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this value",
    "early_stop": "stop on the validation loss with soft resets (reload best/, divide the learning rate)",
    "patience_per_level": "epochs without improvement before a soft reset (or the stop, on the last level)",
    "num_lr_levels": "learning-rate levels before early stopping ends the run",
    "lr_reduction": "each soft reset divides both learning-rate bounds by this",
    "val_every": "also validate every this many optimizer steps (0: only at each epoch end)",
    "val_split": "split of the set to validate on",
    "val_batch_size": "samples per validation batch",
    "val_contrastive_batch_size": "pairs per chunk of the validation contrastive loss",
    "checkpoint_every": "save a checkpoint every this many optimizer steps (and at every epoch end)",
    "keep_checkpoints": "newest checkpoints kept in RUN/checkpoints",
    "loader": "auto (DALI when a GPU and DALI are present), dali or cpu",
    "process_group_timeout_minutes": "how long a collective waits for the other processes (none: torch's default)",
    "num_workers": "CPU loader worker processes (none: this process's share of the cores, less one)",
    "precision": "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16",
    "compile": "torch.compile: auto (blocks on CUDA), off, blocks (each transformer block), regions (blocks and "
               "the steps between them) or model",
    "activation_checkpointing": "recompute each transformer block in backward to save memory (same results)",
    "trim_text_padding": "text decoders skip padding no caption of a batch uses (faster; compiled per block in "
                         "lengths of 16, not with compile=model)",
    "aligned_widths": "auto (on CUDA once measured to help; none is yet), on or off: GEGLU hidden and the fused loss's vocabulary padded to "
                      "multiples of 32 at run time (same parameters and results)",
    "fused_caption_loss": "auto (on CUDA once measured to help), on or off: LM head and caption loss in chunks, no full logits "
                          "(same results, less memory)",
    "clip_in_optimizer": "auto (on CUDA once measured to help), on or off: gradient clipping folded into fused AdamW's grad_scale "
                         "(same results, one pass fewer)",
    "inductor_random": "how compiled graphs draw dropout's numbers: default (inductor), fallback (aten's kernel) "
                       "or align_eager",
    "micro_batch_groups": "contrastive batches per micro-batch (2: micro-batch 384 as two contrastive losses "
                          "of 192, the same maths)",
    "parallelism": "ddp (whole model on every process) or fsdp (FSDP2: weights and optimizer sharded, for 1-2B models)",
    "skip_nonfinite": "skip (and count) a step whose loss or gradient is NaN/Inf instead of failing",
    "max_skipped_fraction": "a run that skipped more than this fraction of its steps ends with an error",
    "break_lock": "take over a run folder's lock left by a run on another host",
    "allow_other_tokenizer": "accept data whose tokenizer differs from the one the run (or --from) recorded",
    "tensorboard": "also write TensorBoard events to RUN/tensorboard",
    "log_every": "output not a terminal: a progress line every this many steps (0: by time only)",
    "log_every_s": "output not a terminal: a progress line at least every this many seconds",
    "wandb_project": "log to Weights & Biases under this project (pip install 'grr-coca[wandb]'; none: off)",
    "wandb_entity": "W&B entity (team or user) of the project (none: your default)",
    "wandb_mode": "W&B mode: online, offline (no network; wandb sync later) or disabled (none: WANDB_MODE or online)",
}

def recipe(name: str) -> TrainConfig:
    """The paper's settings (section 3.6) for `pretrain` or `finetune`."""
    if name == "pretrain":
        return TrainConfig()
    if name == "finetune":
        return replace(
            TrainConfig(), recipe="finetune", lambda_con=1.0, lambda_cap=2.0, dropout=0.1,
            lr_max=1e-5, lr_min=1e-7, warmup_steps=0, early_stop=True,
            # The paper trains "to convergence": the early stopper ends the run, this is a cap.
            epochs=100, checkpoint_every=1000,
        )
    raise ValueError(f"unknown recipe {name!r}; choose one of {RECIPES}")


def unknown_names(names: list[str]) -> str:
    """Unknown setting names, each with the known one closest to it."""
    known = [f.name for f in fields(TrainConfig)]
    return ", ".join(f"{name}{did_you_mean(name, known)}" for name in names)


def _field_type(key: str):
    hints = typing.get_type_hints(TrainConfig)
    return hints[key]


def _base_types(tp) -> tuple[list[type], bool]:
    """(non-None types, whether None is allowed) of a field annotation."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def parse_value(key: str, text: str):
    """Setting `key`'s value from its text as `--set` writes it, typed by TrainConfig's field."""
    kinds, optional = _base_types(_field_type(key))
    if optional and text.lower() in ("none", "null", ""):
        return None
    kind = kinds[0]
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if key == "compile" and text.lower() in ("true", "false"):  # the old boolean spelling
            return "blocks" if text.lower() == "true" else "off"
        return text
    except ValueError:
        raise ValueError(f"--set {key}={text}: expected a {kind.__name__}") from None


def check_type(key: str, value):
    """`value` (from JSON, TOML or YAML) checked against setting `key`'s type; an int is a float where one is wanted."""
    if key == "compile" and isinstance(value, bool):  # runs and files from before compile modes
        value = "blocks" if value else "off"
    kinds, optional = _base_types(_field_type(key))
    if value is None:
        if optional:
            return None
        raise ValueError(f"setting {key} cannot be null")
    kind = kinds[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"setting {key}: expected a {kind.__name__}, got {value!r}")
    return value


def settings_table() -> list[tuple[str, str, str | None, str]]:
    """(name, pretrain default, finetune default where it differs else None, description) per setting."""
    pre, fine = recipe("pretrain"), recipe("finetune")
    rows = []
    for f in fields(TrainConfig):
        a, b = getattr(pre, f.name), getattr(fine, f.name)
        rows.append((f.name, _show(a), None if a == b else _show(b), SETTING_HELP[f.name]))
    return rows


def _show(value) -> str:
    """A default as `--set` spells it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
