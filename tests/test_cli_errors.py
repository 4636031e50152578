"""Mistakes a user makes in `grr eval`, `grr caption`, `grr compare` and `grr model summary`:
each is one line on stderr saying what to do, a non-zero exit, no traceback, and no work done
before the arguments are checked."""

import pytest
import torch
from ckpt_helpers import save_checkpoint
from typer.testing import CliRunner

from grr_cli.main import app
from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding one checkpoint of an untrained tiny model."""
    run = tmp_path_factory.mktemp("run")
    cfg = get_config("grr-tiny", vocab_size=100)
    meta = {"step": 1, "epoch": 0, "world_size": 1, "model_config": cfg.to_dict(),
            "train_config": {"recipe": "pretrain", "data": str(run / "no-data")},
            "special": SpecialIds.for_vocab(100).to_dict()}
    save_checkpoint(run, build_model(cfg), {}, meta, keep=1)
    return run


def grr(*args) -> tuple[int, str]:
    """Exit code and stderr of `grr ARGS`, checked to be one line without a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # an error we raised, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return result.exit_code, lines[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails the test if a run is evaluated: the arguments must be refused first."""
    import grr_train.eval.evaluate

    def evaluate_run(*args, **kwargs):
        raise AssertionError("evaluate_run called before the arguments were checked")

    monkeypatch.setattr(grr_train.eval.evaluate, "evaluate_run", evaluate_run)


def test_eval_on_cuda_without_a_gpu(run, tmp_path, no_cuda, no_evaluation):
    code, line = grr("eval", run, "--data", tmp_path, "--device", "cuda")
    assert code == 1
    assert line.startswith("error: device 'cuda': no CUDA GPU is usable here") and "--device cpu" in line


def test_caption_on_cuda_without_a_gpu(run, tmp_path, no_cuda):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"not read: the device is checked first")
    code, line = grr("caption", image, "--ckpt", run, "--device", "cuda:1")
    assert code == 1 and "device 'cuda:1': no CUDA GPU" in line and "--device cpu" in line


def test_unknown_device_is_named(run, tmp_path, no_evaluation):
    _, line = grr("eval", run, "--data", tmp_path, "--device", "gpu")
    assert "device 'gpu' is not one of cpu, cuda, cuda:N, auto" in line


def test_caption_names_a_missing_image_before_loading_the_model(run, tmp_path, monkeypatch):
    import grr_train.api

    for loader in ("load_model", "load_export"):
        monkeypatch.setattr(grr_train.api, loader, lambda *a, **k: pytest.fail("model loaded before the images were checked"))
    _, line = grr("caption", tmp_path / "nope.jpg", tmp_path / "nope2.jpg", "--ckpt", run, "--device", "cpu")
    assert line == f"error: {tmp_path / 'nope.jpg'}: no such image file (and 1 more)"


def test_compare_checks_both_runs_and_the_data_before_evaluating(run, tmp_path, no_evaluation):
    missing = tmp_path / "runs" / "nope"
    _, line = grr("compare", run, missing, "--data", tmp_path, "--device", "cpu", "--out", tmp_path / "cmp")
    assert str(missing) in line and "not a run folder with checkpoints" in line
    _, line = grr("compare", missing, run, "--data", tmp_path, "--device", "cpu", "--out", tmp_path / "cmp")
    assert str(missing) in line
    _, line = grr("compare", run, run, "--data", tmp_path / "shards", "--device", "cpu", "--out", tmp_path / "cmp")
    assert f"{tmp_path / 'shards' / 'manifest.json'} not found" in line and "grr data shard" in line
    assert not (tmp_path / "cmp").exists()


def test_model_summary_unknown_preset_lists_the_presets():
    from grr_train.model import PRESETS

    code, line = grr("model", "summary", "grr-huge")
    assert code == 1
    assert line == f"error: unknown preset 'grr-huge'; known: {', '.join(PRESETS)}"
    _, line = grr("model", "summary", "grr-cocaa")
    assert line == f"error: unknown preset 'grr-cocaa' (did you mean 'grr-coca'?); known: {', '.join(PRESETS)}"


def test_fetch_unknown_dataset_suggests_the_closest_and_writes_nothing(tmp_path):
    code, line = grr("data", "fetch", "shapez", "--out", tmp_path / "out")
    assert code == 1
    assert line == ("error: unknown dataset 'shapez' (did you mean 'shapes'?); "
                    "choose one of cc12m, mscoco, roco, flickr30k, sample, shapes")
    _, line = grr("data", "fetch", "imagenet", "--out", tmp_path / "out")
    assert line == "error: unknown dataset 'imagenet'; choose one of cc12m, mscoco, roco, flickr30k, sample, shapes"
    assert not (tmp_path / "out").exists()


# ---- grr train pretrain|finetune: every argument is checked before data is read or torchrun starts.

@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the data is read, torchrun is started or training begins."""
    import grr_data.format.manifest
    import grr_train.runtime.distributed
    import grr_train.train.trainer

    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(grr_data.format.manifest.Manifest, "read", fail)
    monkeypatch.setattr(grr_train.runtime.distributed, "relaunch_with_torchrun", fail)
    monkeypatch.setattr(grr_train.train.trainer, "run_training", fail)


def test_train_unknown_preset_lists_the_presets(tmp_path, no_training):
    from grr_train.model import PRESETS

    code, line = grr("train", "pretrain", "--preset", "grr-huge", "--data", tmp_path, "--out", tmp_path / "run")
    assert code == 1
    assert line == f"error: unknown preset 'grr-huge'; known: {', '.join(PRESETS)}"
    _, line = grr("train", "pretrain", "--preset", "basline-coca", "--data", tmp_path, "--out", tmp_path / "run")
    assert line.startswith("error: unknown preset 'basline-coca' (did you mean 'baseline-coca'?); known: ")
    _, line = grr("train", "pretrain", "--set", "lr_mx=1e-4", "--data", tmp_path, "--out", tmp_path / "run")
    assert line.startswith("error: --set 'lr_mx=1e-4': unknown setting 'lr_mx' (did you mean 'lr_max'?); known: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_train_needs_one_process_or_more(tmp_path, no_training, nproc):
    _, line = grr("train", "pretrain", "--nproc-per-node", nproc, "--data", tmp_path, "--out", tmp_path / "run")
    assert line == f"error: --nproc-per-node {nproc}: expected 1 or more processes"


def test_train_set_without_equals_says_how_to_write_it(tmp_path, no_training):
    _, line = grr("train", "pretrain", "--set", "seed", "3", "--data", tmp_path)
    assert line == "error: --set 'seed': expected --set key=value"
    _, line = grr("train", "finetune", "--set", "seed", "3", "roco", "--from", tmp_path)  # 3 taken as DATASET
    assert line == "error: --set 'seed': expected --set key=value"
    _, line = grr("train", "pretrain", "--set", "seed=3", "stray", "--data", tmp_path)
    assert line == "error: unexpected argument 'stray'"


def test_train_unreadable_config_is_named(tmp_path, no_training):
    missing = tmp_path / "nope.json"
    _, line = grr("train", "pretrain", "--config", missing, "--data", tmp_path)
    assert line.startswith(f"error: --config {missing}: cannot read a JSON object") and "No such file" in line
    bad = tmp_path / "bad.json"
    bad.write_text("{seed: 3")
    _, line = grr("train", "pretrain", "--config", bad, "--data", tmp_path)
    assert line.startswith(f"error: --config {bad}: cannot read a JSON object")


def test_train_resume_and_auto_resume_together_are_refused(tmp_path, no_training):
    _, line = grr("train", "pretrain", "--resume", "--auto-resume", "--out", tmp_path / "run")
    assert line.startswith("error: --resume and --auto-resume: pass one")


def test_finetune_names_a_missing_from_before_the_data(tmp_path, no_training):
    missing = tmp_path / "runs" / "nope"
    code, line = grr("train", "finetune", "roco", "--from", missing, "--data", tmp_path / "no-data",
                     "--out", tmp_path / "run")
    assert code == 1 and line == f"error: --from {missing}: no such run or checkpoint folder"
    assert not (tmp_path / "run").exists()


def test_train_data_without_manifest_says_to_shard(run, tmp_path, monkeypatch):
    import grr_train.runtime.distributed
    import grr_train.train.trainer

    monkeypatch.setattr(grr_train.train.trainer, "run_training", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(grr_train.runtime.distributed, "relaunch_with_torchrun", lambda *a: pytest.fail("torchrun started"))
    data = tmp_path / "shards"
    data.mkdir()
    expected = f"error: {data / 'manifest.json'} not found: is {data} a sharded set (grr data shard)?"
    _, line = grr("train", "pretrain", "--data", data, "--out", tmp_path / "run", "--nproc-per-node", "2")
    assert line == expected
    _, line = grr("train", "finetune", "roco", "--from", run, "--data", data, "--out", tmp_path / "run")
    assert line == expected
    assert not (tmp_path / "run").exists()


# ---- a step that does not fit in memory: one line naming the preset, micro-batch and what to change

def test_train_out_of_memory_is_one_line_with_what_to_change(tmp_path, monkeypatch):
    from tiny_run import make_set

    import grr_train.train.trainer

    data, _ = make_set(tmp_path)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free.")

    monkeypatch.setattr(grr_train.train.trainer, "run_training", oom)
    _, line = grr("train", "pretrain", "--preset", "grr-tiny", "--data", data, "--out", tmp_path / "run",
                  "--set", "per_device_batch_size=4", "--set", "global_batch_size=4")
    assert line.startswith("error: out of memory running grr-tiny at micro-batch 4 (CUDA out of memory. Tried")
    assert "--set activation_checkpointing=true" in line and "--set per_device_batch_size=N" in line
    assert "benchmarks/step_memory.py grr-tiny --batch-sizes 4" in line


def test_bench_out_of_memory_is_one_line_and_other_errors_still_raise(monkeypatch):
    import grr_train.train.bench

    def cpu_oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(grr_train.train.bench, "bench_train", cpu_oom)
    _, line = grr("bench", "train", "--preset", "grr-coca-1b", "--batch-size", "48")
    assert line.startswith("error: out of memory running grr-coca-1b at micro-batch 48 ([enforce fail")
    assert "add --activation-checkpointing or lower --batch-size" in line

    def other(*args, **kwargs):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(grr_train.train.bench, "bench_train", other)
    result = CliRunner().invoke(app, ["bench", "train", "--preset", "grr-tiny"])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug, not memory"
