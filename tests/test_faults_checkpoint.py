"""Fault injection on checkpoints and the metrics log (issue 10 items 2, 9, 10, 11): each test makes
the exact fault (a flipped byte of the same size, a damaged safetensors header, a torn last line, a
full disk) and checks that it is caught, named, and that the run falls back where it can."""

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ckpt_helpers import save_best, save_checkpoint
from typer.testing import CliRunner

from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config
from grr_train.runs import checkpoint as ckpt
from grr_train.runs import weights
from grr_train.runs.metrics import MetricsLog, read_metrics, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int):
    torch.manual_seed(seed)
    cfg = get_config("grr-tiny", vocab_size=100, dropout=0.0)
    return cfg, build_model(cfg)


def meta(cfg, step):
    return {"step": step, "epoch": 0, "world_size": 1, "model_config": cfg.to_dict(),
            "train_config": {"recipe": "pretrain"}, "special": SpecialIds.for_vocab(100).to_dict()}


def two_checkpoints(run: Path):
    """Steps 1 and 2 of a run, with different weights; returns the two models."""
    models = []
    for step in (1, 2):
        cfg, model = tiny_model(seed=step)
        save_checkpoint(run, model, {"step": step, "x": torch.arange(1000.0)}, meta(cfg, step), keep=3)
        models.append(model)
    return models


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: the file keeps its size (what a bad disk or a bad copy does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def weights_data_offset(path: Path) -> int:
    """An offset in the middle of a safetensors file's tensor data (past its JSON header)."""
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return 8 + header + (path.stat().st_size - 8 - header) // 2


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ---- a flipped byte of the same size -------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json"])
def test_a_flipped_byte_is_caught_and_the_run_falls_back(tmp_path, capsys, name):
    first, _ = two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000002"
    path = newest / name
    size = path.stat().st_size
    if name == "model.safetensors":
        flip_byte(path, weights_data_offset(path))
    elif name == "state.pt":
        flip_byte(path, size // 2)
    else:  # a digit of the epoch: still valid JSON, so only the checksum can tell
        text = path.read_text()
        path.write_text(text.replace('"epoch": 0', '"epoch": 1'))
    assert path.stat().st_size == size

    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    err = capsys.readouterr().err
    assert str(path) in err and "using step-0000001" in err
    model, info = weights.load_model(tmp_path)  # `grr eval RUN`, `grr caption --ckpt RUN`, `finetune --from RUN`
    assert info["step"] == 1 and same_weights(model, first)
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*damaged"):  # named directly: no fallback
        weights.load_model(newest)


def test_no_intact_checkpoint_left_fails_naming_the_file(tmp_path):
    two_checkpoints(tmp_path)
    for step in (1, 2):
        weights_file = tmp_path / "checkpoints" / f"step-{step:07d}" / "model.safetensors"
        flip_byte(weights_file, weights_data_offset(weights_file))
    with pytest.raises(FileNotFoundError, match="step-0000002/model.safetensors is damaged.*no other checkpoint"):
        weights.load_model(tmp_path)


def test_a_damaged_best_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    _, second = two_checkpoints(tmp_path)
    cfg, model = tiny_model(seed=3)
    save_best(tmp_path, model, {}, meta(cfg, 1))
    flip_byte(tmp_path / "best" / "state.pt", 100)
    loaded, info = weights.load_model(tmp_path)
    assert info["checkpoint"].name == "step-0000002" and same_weights(loaded, second)
    assert f"{tmp_path / 'best' / 'state.pt'} is damaged" in capsys.readouterr().err


def test_cli_caption_and_eval_name_the_damaged_file(tmp_path):
    from PIL import Image

    from grr_cli.main import app

    Image.new("RGB", (32, 32)).save(tmp_path / "image.jpg")
    two_checkpoints(tmp_path)
    weights_file = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    flip_byte(weights_file, weights_data_offset(weights_file))
    for args in (["caption", "--ckpt", str(weights_file.parent), "--device", "cpu", str(tmp_path / "image.jpg")],
                 ["eval", str(weights_file.parent), "--data", str(tmp_path / "no-data"), "--device", "cpu"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert f"{weights_file} is damaged" in result.output
        assert "Traceback" not in result.output


# ---- a damaged safetensors header ----------------------------------------------------------------

def test_a_damaged_safetensors_header_is_named_not_a_bare_safetensor_error(tmp_path):
    two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000002"
    weights_file = newest / "model.safetensors"
    flip_byte(weights_file, 0)  # the header's length
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    with pytest.raises(ckpt.CheckpointError, match=str(weights_file)):
        weights.load_model(newest)
    # the loader itself, called without the check (as a resume does after it): a clear error too
    _, model = tiny_model(seed=0)
    with pytest.raises(ckpt.CheckpointError, match=f"{weights_file}: cannot read the weights"):
        weights.load_weights(model, newest)


def as_saved_before_checksums(folder: Path) -> None:
    (folder / "SHA256SUMS").unlink()
    meta_path = folder / "meta.json"
    record = json.loads(meta_path.read_text())
    del record["checksums"]
    meta_path.write_text(json.dumps(record, indent=2) + "\n")


def test_checkpoints_without_checksums_load_and_their_header_is_still_checked(tmp_path, capsys):
    first, second = two_checkpoints(tmp_path)
    for step in (1, 2):
        as_saved_before_checksums(tmp_path / "checkpoints" / f"step-{step:07d}")
    model, info = weights.load_model(tmp_path)
    assert info["step"] == 2 and same_weights(model, second)
    header = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    data = bytearray(header.read_bytes())
    data[8] = ord("[")  # the JSON header's opening brace: the size is unchanged
    header.write_bytes(bytes(data))
    model, info = weights.load_model(tmp_path)
    assert info["step"] == 1 and same_weights(model, first)
    assert f"{header} is not a readable safetensors file" in capsys.readouterr().err


def test_a_deleted_checksum_file_is_not_taken_for_an_old_checkpoint(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "step-0000002" / "SHA256SUMS").unlink()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"


def test_checksums_are_in_sha256sum_format(tmp_path):
    two_checkpoints(tmp_path)
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed")
    folder = tmp_path / "checkpoints" / "step-0000002"
    result = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count(": OK") == 3, result.stdout + result.stderr


# ---- a torn last line in metrics.jsonl -----------------------------------------------------------

def write_metrics(run: Path, tail: str) -> Path:
    run.mkdir(exist_ok=True)
    path = run / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = write_metrics(tmp_path, '{"kind": "train", "step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert f"{path}:4: dropping a torn last line" in capsys.readouterr().err
    assert truncate_metrics(tmp_path, after_step=2) == 1  # what a resume from step 2 does
    assert path.read_text().splitlines() == [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s})
                                             for s in (1, 2)]


def test_a_new_record_never_joins_a_torn_line(tmp_path, capsys):
    path = write_metrics(tmp_path, '{"kind": "val", "st\x00\x00')  # what a power loss can leave
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"kind": "train", "step": 4, "loss": 0.25})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert "dropping a torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [2, 3], ids=["inside", "last-but-whole"])
def test_a_bad_line_that_is_not_torn_names_the_file_and_line(tmp_path, bad):
    path = write_metrics(tmp_path, "")
    lines = path.read_text().splitlines()
    lines[bad - 1] = lines[bad - 1][:-3]  # a whole line (it has its newline) that is not JSON
    path.write_text("\n".join(lines) + "\n")
    for read in (lambda: read_metrics(tmp_path), lambda: truncate_metrics(tmp_path, 1)):
        with pytest.raises(ValueError, match=f"{path}:{bad}: not a JSON line"):
            read()


# ---- a dead run's temporaries -------------------------------------------------------------------

def test_remove_stale_temporaries(tmp_path):
    two_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step-0000002", root / ".tmp-step-0000003-4242")  # died while saving step 3
    (root / ".latest.tmp-4242").write_text("step-0000003\n")
    shutil.copytree(root / "step-0000001", tmp_path / ".best.old-4242")  # died between best's renames
    shutil.copytree(root / "step-0000002", tmp_path / ".tmp-best-4242")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".latest.tmp-4242", ".tmp-best-4242", ".tmp-step-0000003-4242"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    assert ckpt.checkpoint_problem(tmp_path / "best") is None  # the old best is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]
    assert ckpt.remove_stale_temporaries(tmp_path) == []


# ---- a full disk -----------------------------------------------------------------------------------

def test_a_full_disk_while_logging_names_the_file(tmp_path, monkeypatch):
    import errno
    import io

    from grr_train.runs import metrics as metrics_log

    class FullDisk(io.StringIO):  # simulated: the real one is test_a_full_disk_while_logging_on_a_tmpfs
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    log = MetricsLog(tmp_path, tensorboard=False)
    with pytest.raises(OSError, match=f"No space left on device while writing {tmp_path / 'metrics.jsonl'}"):
        log.log({"kind": "train", "step": 1})


# The error safetensors raised on a real 1 MB tmpfs (test_a_full_disk_while_saving_says_so_and_names_the_checkpoint,
# which needs a private mount namespace): its writes happen in Rust, out of Python's reach.
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


class FullAfter:
    """A file that takes `room` bytes, then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        import errno

        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("full_at", ["model.safetensors", "state.pt", "meta.json", "SHA256SUMS"])
def test_a_simulated_full_disk_while_saving_names_the_checkpoint_and_leaves_no_partial_folder(
        tmp_path, monkeypatch, full_at):
    """The disk fills during the write of `full_at` (ENOSPC at the write, part of the data written);
    no tmpfs or root needed. The save fails with one OSError naming the checkpoint and what to do,
    the partial folder is gone, and the checkpoint before it is still the run's latest."""
    import errno
    import pathlib

    from safetensors import SafetensorError

    cfg, model = tiny_model(seed=0)
    save_checkpoint(tmp_path, model, {"step": 1}, meta(cfg, 1), keep=3)
    if full_at == "model.safetensors":
        def full_disk_save(module, filename):
            pathlib.Path(filename).write_bytes(b"\0" * 4096)  # part of it reached the disk
            raise SafetensorError(SAFETENSORS_FULL_DISK)

        monkeypatch.setattr(ckpt, "save_safetensors_model", full_disk_save)
    elif full_at == "state.pt":
        monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: FullAfter(open(path, mode, *a, **k), 1000),
                            raising=False)
    else:
        real_write_text = pathlib.Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name != full_at:
                return real_write_text(self, data, *args, **kwargs)
            with FullAfter(open(self, "w"), len(data) // 2) as f:
                return f.write(data)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    final = tmp_path / "checkpoints" / "step-0000002"
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, model, {"step": 2}, meta(cfg, 2), keep=3)
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (f"[Errno 28] No space left on device while saving the checkpoint {final}; free space "
                                 "on that disk, then continue with --resume (the checkpoints saved before are intact)")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"


def run_on_small_tmpfs(tmp_path: Path, size: str, script: str, **variables) -> subprocess.CompletedProcess:
    """Run `script` (Python, given DISK, the mount point, and `variables`) where DISK is a tmpfs of
    `size`, in a private mount namespace so nothing is left mounted; skips where that is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("a full disk needs a small tmpfs: `unshare` is not installed")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, which this machine does not allow: {probe.stderr.strip()}")
    values = {"DISK": str(disk), **variables}
    code = "".join(f"{name} = {value!r}\n" for name, value in values.items()) + textwrap.dedent(script)
    return subprocess.run([unshare, "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {disk} && exec '
                           f'"{sys.executable}" -c "$0"', code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


SAVE_ON_A_FULL_DISK = """
    import os, sys, torch
    sys.path.insert(0, "tests")
    from test_faults_checkpoint import meta, tiny_model
    from ckpt_helpers import save_checkpoint
    cfg, model = tiny_model(seed=0)
    state = {"optimizer": [torch.ones(2_000_000)]}  # 8 MB: never fits
    try:
        save_checkpoint(DISK + "/run", model, state, meta(cfg, 1), keep=1)
    except BaseException as err:
        print(type(err).__name__, err)
    print(sorted(os.listdir(DISK + "/run/checkpoints")))
"""


@pytest.mark.slow
@pytest.mark.parametrize("size", ["1m", "5m"], ids=["weights-do-not-fit", "state-does-not-fit"])
def test_a_full_disk_while_saving_says_so_and_names_the_checkpoint(tmp_path, size):
    # grr-tiny's weights are 3.5 MB: on 1 MB safetensors fails, on 5 MB torch.save does
    result = run_on_small_tmpfs(tmp_path, size, SAVE_ON_A_FULL_DISK)
    assert result.returncode == 0, result.stderr[-3000:]
    first, listing = result.stdout.strip().splitlines()[-2:]
    assert first.startswith("OSError [Errno 28] No space left on device while saving the checkpoint "
                            f"{tmp_path / 'disk' / 'run' / 'checkpoints' / 'step-0000001'}"), result.stdout
    assert listing == "[]"  # the partial folder was removed


LOG_ON_A_FULL_DISK = """
    import sys
    from grr_train.runs.metrics import MetricsLog
    log = MetricsLog(DISK, tensorboard=False)
    try:
        for step in range(100_000):  # about 4 MB
            log.log({"kind": "train", "step": step, "loss": 1.0})
        log.close()
    except BaseException as err:
        print(type(err).__name__, err)
"""


@pytest.mark.slow
def test_a_full_disk_while_logging_on_a_tmpfs(tmp_path):
    result = run_on_small_tmpfs(tmp_path, "64k", LOG_ON_A_FULL_DISK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"OSError [Errno 28] No space left on device while writing {tmp_path / 'disk' / 'metrics.jsonl'}"
    ), result.stdout
