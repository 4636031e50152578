"""Where a run's metrics go besides metrics.jsonl: TensorBoard (settings, scalars, example captions)
and Weights & Biases (the same scalars; one W&B run continued across resumes, offline without network).

The W&B routing is tested with a stand-in `wandb` module that records the calls (fast, always
runs); a real offline run of the wandb package, resumed once, is tested where wandb is installed
(the `wandb` extra) and skipped with that reason where it is not."""

import json
import shutil
import struct
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from grr_train.runs.metrics import MetricsLog, read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.settings import resume_config

sys.path.insert(0, str(Path(__file__).parent))
from test_shard import caption, make_fetch_output  # noqa: E402  (sets HF_HUB_OFFLINE=1)

from grr_data.shard.run import shard_dataset  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR  # noqa: E402


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, values, step):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module that records init, log and finish."""
    calls = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module.init = init
    module.Table = lambda columns, data: {"columns": columns, "data": data}
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_records_reach_wandb_under_tensorboards_names_and_resumes_keep_the_id(tmp_path, fake_wandb):
    settings = {"project": "grr-test", "entity": "me", "mode": "offline", "config": {"train": {"seed": 3}}}
    log = MetricsLog(tmp_path, tensorboard=False, wandb=settings)
    log.log({"kind": "train", "step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-4, "time": 5.0})
    log.log({"kind": "val", "step": 1, "split": "val", "loss": 3.25, "perplexity": float("nan"), "time": 6.0})
    log.log({"kind": "event", "step": 1, "what": "stop"})
    log.log_captions(1, "val/examples", [("k0", "a red circle", "a red square")])
    log.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    init = fake_wandb[0][1]
    assert init == {"project": "grr-test", "entity": "me", "mode": "offline", "id": run_id, "resume": "allow",
                    "dir": str(tmp_path), "name": tmp_path.name, "config": {"train": {"seed": 3}}}
    assert fake_wandb[1:] == [
        ("log", {"train/loss": 2.5, "train/lr": 1e-4}, 1),
        ("log", {"val/loss": 3.25}, 1),  # a NaN is left out, as for TensorBoard
        ("log", {"val/examples": {"columns": ["sample", "reference", "generated"],
                                  "data": [["k0", "a red circle", "a red square"]]}}, 1),
        ("finish",)]
    fake_wandb.clear()
    MetricsLog(tmp_path, tensorboard=False, wandb=settings, purge_step=2).close()  # a resume: the same W&B run
    assert fake_wandb[0][1]["id"] == run_id
    fake_wandb.clear()
    MetricsLog(tmp_path, tensorboard=False, wandb=settings).close()  # a fresh start: a new one
    assert fake_wandb[0][1]["id"] != run_id
    assert fake_wandb[0][1]["id"] == (tmp_path / "wandb_id").read_text().strip()


def test_wandb_setting_without_the_package_is_refused_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"wandb_project=p needs the wandb package, which is not installed: "
                                         r"pip install 'grr-coca\[wandb\]'"):
        replace(TrainConfig(), wandb_project="p").validate()
    with pytest.raises(ValueError, match="wandb_mode must be one of online, offline, disabled"):
        replace(TrainConfig(), wandb_mode="offlne").validate()


def make_run_data(root: Path) -> Path:
    """40 pairs of a real (sample) tokenizer in a folder of its own, so that the run copies it: 38 train, 2 val."""
    tokenizer = root / "tokenizer"
    shutil.copytree(SAMPLE_TOKENIZER_DIR, tokenizer)
    make_fetch_output(root / "in", num_tars=1, per_tar=40)
    shard_dataset(root / "in", root / "data", tokenizer=str(tokenizer), progress=False, workers=1)
    return root / "data"


def tiny(data: Path, **kw) -> TrainConfig:
    return replace(TrainConfig(), preset="grr-tiny", data=str(data), per_device_batch_size=4, global_batch_size=4,
                   warmup_steps=1, lr_max=1e-3, lr_min=1e-4, num_workers=0, loader="cpu", val_batch_size=4,
                   val_every=2, checkpoint_every=2, keep_checkpoints=1, epochs=1, **kw)


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B `.wandb` file: W&B's header, then LevelDB-log records of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full or first / middle or last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow
def test_offline_wandb_and_tensorboard_through_a_run_and_its_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'grr-coca[wandb]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grr_train.train.trainer import run_training

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data, run = make_run_data(tmp_path), tmp_path / "run"
    run_training(tiny(data, max_steps=2, wandb_project="grr-test", wandb_mode="offline"), run)
    run_training(resume_config(run, max_steps=3), run, resume=True)

    run_id = (run / "wandb_id").read_text().strip()
    sessions = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2  # one per process; `wandb sync` joins them by the id
    logged = [wandb_history(s / f"run-{run_id}.wandb") for s in sessions]
    train = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    assert {row["_step"]: row["train/loss"] for row in logged[0] if "train/loss" in row} == {1: train[1], 2: train[2]}
    assert {row["_step"]: row["train/loss"] for row in logged[1] if "train/loss" in row} == {3: train[3]}
    val = read_metrics(run, "val")[0]
    assert any(row.get("val/loss") == val["loss"] and row["_step"] == 2 for row in logged[0])

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert {"settings/text_summary", "val/examples/text_summary"} <= set(events.Tags()["tensors"])
    table = events.Tensors("val/examples/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 00000_")]
    assert len(rows) == 2  # the val split's 2 samples, with their reference captions decoded
    assert all(row[1] in {caption(n) for n in range(40)} for row in rows)
