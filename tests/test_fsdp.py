"""FSDP2 (`parallelism=fsdp`) on the CPU with gloo and 2 processes, against DDP, and its sharded
checkpoints (torch.distributed.checkpoint).

- The same losses as DDP: with dropout off, FSDP computes what DDP does up to float summation
  order (gradients are averaged over ranks in fp32 by both; nothing is cast on the CPU).
  Tolerance: 1e-5 relative on every step's losses and gradient norm and on the validation loss,
  over 3 steps with gradient accumulation (FSDP's `set_requires_gradient_sync` for DDP's no_sync);
  measured on the dev CPU: at most 2.3e-7. The weights after 3 AdamW steps: within a tolerance
  set by the learning rate and the number of steps (`assert_close_after_adamw` says why).
- Resume: saved on 2 processes, resumed on 2 equals the uninterrupted run exactly (same shards,
  optimizer state, loader position and RNG states); resumed on 1 (DCP reshards to one plain
  model) the epoch continues at the same sample and matches up to float summation order (1e-5).
- Memory: each of the 2 processes holds half of the parameters, gradients and AdamW state.
- One process reads a sharded checkpoint whole: `grr export` writes one safetensors file and
  `grr eval` runs.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import reference_losses as reference
import torch
from typer.testing import CliRunner

from grr_train.model import build_model, get_config
from grr_train.runs import checkpoint as ckpt
from grr_train.runs import weights
from grr_train.runs.metrics import read_metrics
from grr_train.runs.sharded import load_sharded, load_whole_weights, save_sharded
from grr_train.train.config import TrainConfig
from grr_train.train.settings import resume_config
from grr_train.train.trainer import run_training

sys.path.insert(0, str(Path(__file__).parent))
from test_train import check_soft_reset, make_data, soft_reset_run, tiny, train_losses  # noqa: E402
from tiny_run import make_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# ---- one process, no process group ------------------------------------------------------------

def test_parallelism_setting_is_checked():
    with pytest.raises(ValueError, match="parallelism must be one of"):
        TrainConfig(parallelism="zero3").validate()
    with pytest.raises(ValueError, match="compile=model does not combine with parallelism=fsdp"):
        TrainConfig(parallelism="fsdp", compile="model").validate()
    TrainConfig(parallelism="fsdp", compile="blocks").validate()


def _stepped(seed: int):
    torch.manual_seed(seed)
    model = build_model(get_config("grr-tiny", dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randn(2, 3, 288, 288), torch.randint(2, 100, (2, 64)))
    (out.logits.mean() + out.image_embed.sum() + out.text_embed.sum()).backward()  # every weight
    optimizer.step()
    return model, optimizer


@pytest.mark.slow  # ~11 s on the loaded dev CPU
def test_sharded_checkpoint_round_trip_and_integrity(tmp_path):
    model, optimizer = _stepped(0)
    final = ckpt.checkpoint_folder(tmp_path, 1)
    save_sharded(final, model, optimizer, {"step": 1}, {"step": 1}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == final
    sums = ckpt._read_sums(final)
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "state.pt", "meta.json"} <= set(sums)
    assert ckpt.checkpoint_problem(final) is None
    assert ckpt.read_meta(final)["sharded"] is True
    assert sorted(weights.weight_names(final)) == sorted(model.state_dict())

    other, other_optimizer = _stepped(1)  # other weights and optimizer moments
    load_whole_weights(other, final)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    other, other_optimizer = _stepped(1)
    load_sharded(final, other, other_optimizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    for mine, theirs in zip(optimizer.state.values(), other_optimizer.state.values(), strict=True):
        assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])

    wide = build_model(get_config("grr-tiny", width=128))
    with pytest.raises(ckpt.CheckpointError, match="shapes differ"):
        load_whole_weights(wide, final)

    # a changed byte in a shard is found, and the run falls back to its older intact checkpoint
    newer = ckpt.checkpoint_folder(tmp_path, 2)
    save_sharded(newer, model, optimizer, {"step": 2}, {"step": 2}, keep=2)
    shard = newer / "sharded" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert "__0_0.distcp is damaged" in ckpt.checkpoint_problem(newer)
    assert ckpt.latest_checkpoint(tmp_path) == final
    shard.write_bytes(bytes(data[:1000]))  # read without the checks: one line naming the folder
    with pytest.raises(ckpt.CheckpointError, match=r"sharded: cannot read the weights \(EOFError\)"):
        load_whole_weights(build_model(get_config("grr-tiny")), newer)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("small"), (4,), (4,))


@pytest.mark.slow
def test_one_process_finetunes_from_a_sharded_run_with_soft_resets(tmp_path, small_data, monkeypatch):
    # One process with parallelism=fsdp trains the plain model but saves sharded checkpoints:
    # `--from` reads one whole, `best/` is written sharded and the soft reset reloads it
    # (load_sharded): weights and moments of best/, the learning rate divided (test_train.py's rule).
    summary, records = soft_reset_run(tmp_path, small_data, monkeypatch, parallelism="fsdp")
    assert (tmp_path / "pre" / "checkpoints" / "step-0000001" / "sharded").is_dir()
    best = tmp_path / "fine" / "best"
    assert ckpt.checkpoint_problem(best) is None and (best / "sharded").is_dir()
    check_soft_reset(tmp_path / "fine", summary, records)


@pytest.mark.slow
def test_one_process_sharded_resume_is_exact_with_dropout(tmp_path):
    # 12 samples, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch, 6 in all.
    data = make_data(tmp_path / "data", (6, 6), (4,))
    cfg = tiny(data, dropout=0.15, parallelism="fsdp")
    run_training(cfg, tmp_path / "full")
    run_training(TrainConfig(**{**cfg.to_dict(), "max_steps": 4}), tmp_path / "part")  # inside epoch 2
    run_training(resume_config(tmp_path / "part", max_steps=6), tmp_path / "part", resume=True)
    assert len(train_losses(tmp_path / "full")) == 6
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")  # exact


# ---- 2 processes under torchrun ---------------------------------------------------------------

def train(data: Path, out: Path, nproc: int, parallelism: str, steps: int, resume: bool = False,
          extra: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "grr_cli.main", "train", "pretrain", "--preset", "grr-tiny", "--data", str(data),
           "--out", str(out), "--max-steps", str(steps), "--nproc-per-node", str(nproc)]
    # contrastive batch 2 out of a global 4: on 2 processes 1 sample a micro-batch, 2 micro-batches a
    # step; on 1 process 2 and 2, from the same samples
    for s in ("contrastive_batch_size=2", "global_batch_size=4", "dropout=0", "num_workers=0", "loader=cpu",
              "warmup_steps=0", "lr_max=1e-3", "lr_min=1e-3", "tensorboard=false", "val_contrastive_batch_size=2",
              "val_batch_size=2", "checkpoint_every=2", "keep_checkpoints=3", f"parallelism={parallelism}", *extra):
        cmd += ["--set", s]
    done = subprocess.run(cmd + (["--resume"] if resume else []), cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """3 steps of FSDP on 2 processes (checkpoints at steps 2 and 3), on 12 train and 4 val samples."""
    root = tmp_path_factory.mktemp("fsdp")
    data = make_data(root / "data", (12,), (4,))
    train(data, root / "fsdp", 2, "fsdp", 3)
    return data, root / "fsdp"


def assert_same_steps(expected: list[dict], got: list[dict], rel: float | None) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            if rel is None:
                assert b[key] == a[key], (a["step"], key)
            else:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)


@pytest.mark.slow
def test_fsdp_gives_the_losses_and_weights_of_ddp(fsdp_run, tmp_path):
    data, fsdp = fsdp_run
    train(data, tmp_path / "ddp", 2, "ddp", 3)
    assert_same_steps(read_metrics(tmp_path / "ddp", "train"), read_metrics(fsdp, "train"), rel=TOL)
    val_ddp, val_fsdp = read_metrics(tmp_path / "ddp", "val"), read_metrics(fsdp, "val")
    assert val_fsdp[0]["num_samples"] == 4
    assert val_fsdp[0]["loss"] == pytest.approx(val_ddp[0]["loss"], rel=TOL)
    # the sharded checkpoint read whole into a plain model holds DDP's weights, as close as AdamW lets them be
    sharded, _ = weights.load_model(fsdp / "checkpoints" / "step-0000003")
    whole, _ = weights.load_model(tmp_path / "ddp" / "checkpoints" / "step-0000003")
    assert not (fsdp / "checkpoints" / "step-0000003" / ckpt.WEIGHTS).exists()
    assert_close_after_adamw(sharded.state_dict(), whole.state_dict(), lr=1e-3, steps=3)


def assert_close_after_adamw(got: dict, expected: dict, lr: float, steps: int) -> None:
    """Weights of two runs whose gradients agree up to float summation order, after `steps` AdamW
    steps at `lr` (no warm-up), from the same start.

    AdamW moves each element by lr x m / (sqrt(v) + eps): about lr whatever the gradient's size,
    and in the gradient's direction. Where a gradient is far from 0 the two runs take the same step
    to ~1e-7 relative; where it is near 0 (a token embedding row of a rare token) the summation-order
    difference can flip its sign, and the two elements then differ by up to 2 x lr a step: a
    difference set by lr and the number of steps, not by the machine (one element of token_embed
    once differed by 2.3e-6 on a 2-core CI machine, past a fixed 1e-6). So:
    - every element within 2.1 x lr x steps (|m_hat / sqrt(v_hat)| <= 1.003 for these betas at
      step <= 3, by Cauchy-Schwarz over the moments' weights; weight decay adds lr x 1e-3 x |w|);
    - over the whole model, the root mean square difference under 1% of lr x steps: flips of a few
      near-zero-gradient elements pass (~25 full flips of grr-tiny's ~1M would reach it), a real
      difference of the gradients, which moves most elements, does not.
    The gradients themselves are compared before any update in tests/test_step_ddp.py."""
    assert got.keys() == expected.keys()
    bound = 2.1 * lr * steps
    squares, count = 0.0, 0
    for name, tensor in expected.items():
        diff = (got[name].double() - tensor.double()).abs()
        assert float(diff.max()) <= bound, (name, float(diff.max()), bound)
        squares, count = squares + float(diff.pow(2).sum()), count + diff.numel()
    rms = (squares / count) ** 0.5
    assert rms <= 0.01 * lr * steps, (rms, 0.01 * lr * steps)


def interrupted_copy(run: Path, into: Path) -> Path:
    """`run` as it was had it stopped right after saving step 2 (step 3's checkpoint and metrics gone:
    the resume truncates metrics.jsonl itself)."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step-0000003")
    (into / "checkpoints" / "latest").write_text("step-0000002\n")
    return into


@pytest.mark.slow
def test_saved_on_two_resumed_on_two_is_exact(fsdp_run, tmp_path):
    data, fsdp = fsdp_run
    moved = interrupted_copy(fsdp, tmp_path / "moved")
    train(data, moved, 2, "fsdp", 3, resume=True)
    assert_same_steps(read_metrics(fsdp, "train"), read_metrics(moved, "train"), rel=None)
    assert read_metrics(moved, "val")[0]["loss"] == read_metrics(fsdp, "val")[0]["loss"]


@pytest.mark.slow
def test_saved_on_two_resumed_on_one(fsdp_run, tmp_path):
    data, fsdp = fsdp_run
    moved = interrupted_copy(fsdp, tmp_path / "moved")
    done = train(data, moved, 1, "fsdp", 3, resume=True)
    assert "saved by 2 processes and resumes on 1: continuing epoch 0 at the same sample" in done.stdout + done.stderr
    assert_same_steps(read_metrics(fsdp, "train"), read_metrics(moved, "train"), rel=TOL)
    assert ckpt.read_meta(moved / "checkpoints" / "step-0000003")["world_size"] == 1


@pytest.mark.slow
def test_each_of_two_processes_holds_half_the_parameters():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "fsdp_probe.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    whole = records[0]["whole"]
    assert sum(r["parameters"] for r in records) == whole  # every element on exactly one rank
    for r in records:
        # dim-0 shards: a tensor of odd length puts one row more on rank 0
        assert r["parameters"] <= 0.501 * whole, r
        assert r["gradients"] == r["exp_avg"] == r["parameters"], r


@pytest.mark.slow
def test_a_sharded_run_exports_and_evaluates_on_one_process(tmp_path):
    from grr_cli.main import app

    data, _ = make_set(tmp_path)  # 8 train samples, a real tokenizer
    run = tmp_path / "run"
    train(data, run, 2, "fsdp", 1, extra=("val_split=none", "contrastive_batch_size=4", "lambda_con=0.6",
                                          "lambda_cap=1.4"))
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "exported" / ckpt.WEIGHTS)
    model, info = weights.load_model(run)
    assert exported.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--split", "train", "--device", "cpu",
                                      "--batch-size", "4", "--contrastive-batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output[result.output.index("{"):])
    assert evaluated["num_samples"] == 8
    # the numbers themselves, from the exported weights and the reference losses: contrastive over the
    # two chunks of 4 in plan order, caption over every counted token, the run's weights 0.6 and 1.4
    from grr_data.loader import make_loader

    (batch,) = list(make_loader(data, "train", batch_size=8, kind="cpu", shuffle=False, num_workers=0))
    model.load_state_dict(exported)
    with torch.no_grad():
        out = model.eval()(batch["images"], batch["ids"])
    ignored = info["special"].ignored_targets
    targets = batch["ids"][:, 1:]
    caption = float(reference.caption_sum(out.logits, targets, ignored) / reference.counted(targets, ignored).sum())
    contrastive = sum(float(reference.contrastive(out.image_embed[s : s + 4], out.text_embed[s : s + 4], 0.07))
                      for s in (0, 4)) / 2
    assert (evaluated["lambda_con"], evaluated["lambda_cap"]) == (0.6, 1.4)
    assert evaluated["caption"] == pytest.approx(caption, rel=1e-5)
    assert evaluated["contrastive"] == pytest.approx(contrastive, rel=1e-5)
    assert evaluated["loss"] == pytest.approx(0.6 * contrastive + 1.4 * caption, rel=1e-5)
    assert evaluated["perplexity"] == pytest.approx(math.exp(caption), rel=1e-5)


def test_the_adamw_tolerance_passes_sign_flips_and_fails_real_differences():
    torch.manual_seed(0)
    lr, steps = 1e-3, 3
    expected = {"embed": torch.randn(16000, 64) * 0.02, "bias": torch.randn(64) * 0.02}  # grr-tiny's ~1M
    flipped = {k: v.clone() for k, v in expected.items()}
    flipped["embed"][7, 3] += 2 * lr * steps  # one near-zero-gradient element stepped the other way
    flipped["bias"][5] -= 2 * lr * steps
    assert_close_after_adamw(flipped, expected, lr, steps)
    moved = {k: v + 0.5 * lr * steps * torch.sign(torch.randn_like(v)) for k, v in expected.items()}
    with pytest.raises(AssertionError):  # every element off by half the possible AdamW travel
        assert_close_after_adamw(moved, expected, lr, steps)
    beyond = {k: v.clone() for k, v in expected.items()}
    beyond["bias"][0] += 2.2 * lr * steps  # farther than AdamW can take one element in 3 steps
    with pytest.raises(AssertionError):
        assert_close_after_adamw(beyond, expected, lr, steps)
