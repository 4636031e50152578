"""`grr export`: a run as a folder in the Hugging Face layout, the class that loads it back, and the push.

    DIR/config.json        HubCoCa's arguments: the model config, special ids, the tokenizer's
                           record (with its files' SHA-256) and where the weights came from
    DIR/model.safetensors  the checkpoint's weights, under the same names
    DIR/spiece.model ...   the tokenizer's files (the run's copy)
    DIR/tokenizer_config.json  what `transformers.AutoTokenizer` needs to read them with BOS and CLS
    DIR/modeling_grr_coca.py, DIR/grr_*.py  the model code (grr_train.infer.export_code): config.json's
                           `model_type` and `auto_map` let `AutoModel.from_pretrained(DIR,
                           trust_remote_code=True)` load the export where grr is not installed
    DIR/README.md          the model card (grr_train.infer.model_card)

`HubCoCa.from_pretrained(DIR or a hub repo id)` rebuilds the model (huggingface_hub's
`PyTorchModelHubMixin`); `grr_train.api.load(DIR)` gives it with its tokenizer and preprocessing.
The hub code stays here: `grr_train.model` imports without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin

from grr_data.format.layout import SEQ_LEN
from grr_data.infra.files import fsync_path, publish
from grr_data.tokenizer import BOS_TOKEN, CLS_TOKEN
from grr_train.infer.captioning import choose_tokenizer, load_choice
from grr_train.infer.export_code import AUTO_MAP, write_code
from grr_train.infer.model_card import LICENSE, TAGS, model_card
from grr_train.model import CoCa, ModelConfig
from grr_train.model.config import preset_of
from grr_train.runs.checkpoint import WEIGHTS, read_meta, resolve_checkpoint
from grr_train.runs.tokenizer import MODEL_FILES, read_tokenizer_files, run_folder_of, write_tokenizer_files
from grr_train.runs.weights import load_weights

EXPORT_FORMAT = 1
# What transformers reads in config.json beside HubCoCa's arguments (HubCoCa ignores these keys;
# transformers' GrrCocaConfig keeps HubCoCa's as fields).
TRANSFORMERS_FIELDS = {"model_type": "grr_coca", "architectures": ["GrrCocaModel"], "auto_map": AUTO_MAP,
                       "dtype": "float32"}


class HubCoCa(CoCa, PyTorchModelHubMixin, library_name="grr-coca", tags=[*TAGS], pipeline_tag="image-to-text",
              license=LICENSE):
    """CoCa with `save_pretrained` / `from_pretrained` / `push_to_hub`; config.json holds these arguments.

    `special`: the token layout's ids; `tokenizer`: the run's tokenizer record, its files' SHA-256
    in `run_copy`; `source`: the run, checkpoint, step, preset and recipe the weights came from."""

    def __init__(self, model_config: dict, special: dict | None = None, tokenizer: dict | None = None,
                 source: dict | None = None) -> None:
        super().__init__(ModelConfig.from_dict(model_config))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        # The mixin loads non-strictly by default (a missing weight would stay random) and prints a line.
        if os.path.isdir(model_id):
            return cls._load_as_safetensor(cls(**model_kwargs), os.path.join(model_id, WEIGHTS), map_location, strict)
        return super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                         force_download=force_download, local_files_only=local_files_only,
                                         token=token, map_location=map_location, strict=strict, **model_kwargs)


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a `grr export` folder (weights and config.json, no checkpoint meta.json)."""
    path = Path(path)
    if not ((path / WEIGHTS).is_file() and (path / "config.json").is_file()) or (path / "meta.json").exists():
        return False
    try:
        return "model_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def read_export_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        ModelConfig.from_dict(config["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a grr export's config ({err}); export the run again with `grr export`") from err
    return config


def export_run(run_or_ckpt: str | os.PathLike, out: str | os.PathLike,
               tokenizer: str | os.PathLike | None = None) -> Path:
    """Write the run's best (else newest intact) checkpoint, or the checkpoint named, into the new
    folder `out` in the Hugging Face layout; returns `out`. The folder appears whole or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or remove it")
    ckpt = resolve_checkpoint(run_or_ckpt)
    meta = read_meta(ckpt)
    choice = choose_tokenizer(run_or_ckpt, tokenizer, meta["train_config"].get("data"))
    tok = load_choice(choice)
    files = read_tokenizer_files(choice.folder)
    hashes = {f: hashlib.sha256(data).hexdigest() for f, data in files.items() if f in MODEL_FILES}
    record = dict(meta.get("tokenizer") or tok.record(),
                  run_copy={"folder": ".", "files_sha256": hashes})
    run_dir = run_folder_of(run_or_ckpt, ckpt)
    train = meta["train_config"]
    source = {"format": EXPORT_FORMAT, "run": run_dir.resolve().name if run_dir else None,
              "checkpoint": ckpt.name, "step": meta["step"], "epoch": meta.get("epoch"),
              "preset": preset_of(meta["model_config"]) or train.get("preset"), "recipe": train.get("recipe")}
    model = HubCoCa(model_config=meta["model_config"], special=meta["special"], tokenizer=record, source=source)
    load_weights(model, ckpt)
    model.eval()

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    write_tokenizer_files(files, tmp)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(files), indent=2) + "\n")
    write_code(tmp)
    num_params = sum(p.numel() for p in model.parameters())
    (tmp / "README.md").write_text(model_card(num_params, meta, record, source, run_dir))
    model.save_pretrained(tmp)  # config.json and model.safetensors; keeps our README.md
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, **TRANSFORMERS_FIELDS}, indent=2) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    publish(tmp, out)
    return out


def tokenizer_config(files: dict[str, bytes]) -> dict:
    """tokenizer_config.json of an export: the run copy's (if it had one) with what makes
    `AutoTokenizer` give grr's ids: T5's class, BOS and CLS as the last two ids, a literal `<bos>`
    in a caption split into pieces as grr's shards have it, and at most 61 words and EOS."""
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    return {"tokenizer_class": "T5Tokenizer", **config, "bos_token": BOS_TOKEN, "cls_token": CLS_TOKEN,
            "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "split_special_tokens": True,
            "model_max_length": SEQ_LEN - 3}


def load_export(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HubCoCa, dict]:
    """(the model of an export folder, in eval mode on `device`; its config.json)."""
    config = read_export_config(folder)
    model = HubCoCa.from_pretrained(str(folder), map_location=str(device))
    return model.to(device).eval(), config


def download_export(repo_id: str) -> Path:
    """A local folder holding the hub repo `repo_id` (an export pushed with `grr export --push`)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, unknown repo, no rights: the same advice for all
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{repo_id}: not a local folder, and it cannot be fetched from the hub ({type(err).__name__}: "
                         f"{reason}); give the path of a run, a checkpoint or a `grr export` folder") from None


def push_export(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an export folder to the hub repo `repo_id` (created if needed); returns the commit's URL.
    Without network or a token: one ValueError saying so (the folder stays complete, to push later)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="grr export")
    except Exception as err:  # offline, refused, no token, no rights: the same advice for all
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"could not push {folder} to the hub repo {repo_id!r} ({type(err).__name__}: {reason}); "
                         "pushing needs network access and a token (`hf auth login` or HF_TOKEN); the export in "
                         f"{folder} is complete: push it later with `hf upload {repo_id} {folder}`") from None
    return str(getattr(commit, "commit_url", commit))
