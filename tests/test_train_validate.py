"""Validation counts every usable sample of a split exactly once, whatever the batch size and the
number of ranks: the loader's padding repeats (the last global step) and its substitutes for
unusable samples are left out of every sum, and the contrastive chunks are cut from the real
samples in plan order (grr_train.train.validate)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import reference_losses as reference
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grr_data.loader import make_loader
from grr_train.eval.evaluate import RealSamples
from grr_train.model import build_model, get_config
from grr_train.train.validate import validate

sys.path.insert(0, str(Path(__file__).parent))
from shardset import _photos, make_shardset, photo_jpeg  # noqa: E402

NUM_SAMPLES, CHUNK = 7, 3
LAMBDA_CON, LAMBDA_CAP = 0.7, 1.3  # distinct, not 1: a dropped or swapped weight changes the loss
CORRUPT = 2  # the sample made unreadable in `corrupt_data`: batch size 4 replaces it by sample 3


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    photos = _photos()
    return [photo_jpeg(rng, photos) for _ in range(NUM_SAMPLES)]


@pytest.fixture(scope="module")
def val_data(tmp_path_factory, images):
    return make_shardset(tmp_path_factory.mktemp("val7"), (NUM_SAMPLES,), split="val", images=images)


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory, images):
    """`val_data` (same captions: they do not depend on the images given) with one JPEG cut short."""
    bad = list(images)
    bad[CORRUPT] = bad[CORRUPT][: len(bad[CORRUPT]) // 3]
    return make_shardset(tmp_path_factory.mktemp("val7bad"), (NUM_SAMPLES,), split="val", images=bad)


def tiny_model():
    torch.manual_seed(0)
    return build_model(get_config("grr-tiny", dropout=0.0, vocab_size=1000)).eval()


def run_validate(model, data, batch_size, rank=0, world_size=1):
    loader = make_loader(data, split="val", batch_size=batch_size, kind="cpu", rank=rank, world_size=world_size,
                         shuffle=False, num_workers=0)
    return validate(model, loader, loader.special, lambda_con=LAMBDA_CON, lambda_cap=LAMBDA_CAP, temperature=0.07,
                    contrastive_batch_size=CHUNK)


@torch.no_grad()
def straight(model, data, keep=tuple(range(NUM_SAMPLES))) -> dict:
    """The metrics computed by hand over the samples `keep` of the intact set, all in one batch
    (no padding, no substitute involved), with the reference losses (tests/reference_losses.py)."""
    loader = make_loader(data, split="val", batch_size=NUM_SAMPLES, kind="cpu", shuffle=False, num_workers=0)
    (batch,) = list(loader)
    special = loader.special
    keep = list(keep)
    out = model(batch["images"][keep], batch["ids"][keep])
    targets = batch["ids"][keep, 1:]
    caption_sum = float(reference.caption_sum(out.logits, targets, special.ignored_targets))
    tokens = int((~torch.isin(targets, torch.tensor(special.ignored_targets))).sum())
    n = len(keep)
    chunks = [float(reference.contrastive(out.image_embed[s : s + CHUNK], out.text_embed[s : s + CHUNK], 0.07))
              for s in range(0, n - CHUNK + 1, CHUNK)]
    return {"caption": caption_sum / tokens, "num_tokens": tokens, "contrastive": sum(chunks) / len(chunks),
            "num_samples": n, "num_contrastive_dropped": n % CHUNK}


GOOD = tuple(i for i in range(NUM_SAMPLES) if i != CORRUPT)


def assert_same(result: dict, expected: dict) -> None:
    assert result["num_samples"] == expected["num_samples"]
    assert result["num_tokens"] == expected["num_tokens"]
    assert result["num_contrastive_dropped"] == expected["num_contrastive_dropped"]
    assert result["caption"] == pytest.approx(expected["caption"], rel=1e-5)
    assert result["contrastive"] == pytest.approx(expected["contrastive"], rel=1e-5)
    loss = 0.7 * expected["contrastive"] + 1.3 * expected["caption"]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected["caption"]), rel=1e-5)


@pytest.mark.parametrize("batch_size", [4, 2, 7])
def test_one_rank_counts_each_sample_once(val_data, batch_size):
    model = tiny_model()
    assert_same(run_validate(model, val_data, batch_size), straight(model, val_data))


@pytest.mark.parametrize("batch_size", [4, 2])
def test_a_corrupt_sample_is_left_out_not_counted_twice(val_data, corrupt_data, batch_size):
    model = tiny_model()
    result = run_validate(model, corrupt_data, batch_size)
    assert result["num_samples"] == NUM_SAMPLES - 1
    assert_same(result, straight(model, val_data, GOOD))


def _worker(rank: int, world_size: int, sets: list[str], init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        results = {f"{i}/{b}": run_validate(model, data, b, rank, world_size)
                   for i, data in enumerate(sets) for b in BATCH_SIZES_2_RANKS}
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# Batch 4: rank 1's only batch holds 3 real samples and a repeat. Batch 3: in the last step rank 0
# holds 1 real sample and rank 1 none. One process group for both (starting one costs seconds).
BATCH_SIZES_2_RANKS = (4, 3)


def test_two_ranks_together_count_each_sample_once(val_data, corrupt_data, tmp_path):
    out = tmp_path / "result"
    sets = [str(val_data), str(corrupt_data)]
    mp.spawn(_worker, args=(2, sets, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    model = tiny_model()
    expected = [straight(model, val_data), straight(model, val_data, GOOD)]
    for rank in range(2):  # every rank reports the split's numbers
        results = json.loads(Path(f"{out}.{rank}").read_text())
        for i, batch_size in ((i, b) for i in range(len(sets)) for b in BATCH_SIZES_2_RANKS):
            assert_same(results[f"{i}/{batch_size}"], expected[i])


def test_eval_keeps_real_samples_only_and_stops_at_max_samples():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    batches = [
        # "b" could not be read: the loader put "c" in its slot too
        {"images": images[[0, 2, 2]], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["a", "c", "c"],
         "real": torch.tensor([True, False, True])},
        # the loader pads its last batch with the first samples again
        {"images": images[[3, 0, 1]], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["d", "a", "b"],
         "real": torch.tensor([True, False, False])},
    ]
    seen = [(b["keys"], b["real"].tolist(), b["images"][:, 0, 0, 0].tolist()) for b in RealSamples(batches)]
    assert seen == [(["a", "c"], [True, True], [0.0, 2.0]), (["d"], [True], [3.0])]
    assert [b["keys"] for b in RealSamples(batches, max_samples=1)] == [["a"]]
    assert [b["keys"] for b in RealSamples(batches, max_samples=3)] == [["a", "c"], ["d"]]


def test_eval_precision_follows_the_run_unless_told():
    from grr_train.eval.evaluate import resolve_precision

    assert resolve_precision("auto", {"precision": "auto"}, "cpu") == "fp32"
    assert resolve_precision("auto", {"precision": "auto"}, "cuda:0") == "bf16"
    assert resolve_precision("auto", {"precision": "bf16"}, "cpu") == "bf16"
    assert resolve_precision("auto", {"precision": "fp32"}, "cuda") == "fp32"
    assert resolve_precision("bf16", {"precision": "fp32"}, "cpu") == "bf16"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", {}, "cpu")


def test_bf16_autocast_validation_is_close_to_fp32(val_data):
    model = tiny_model()
    loader = make_loader(val_data, split="val", batch_size=4, kind="cpu", shuffle=False, num_workers=0)
    bf16 = validate(model, loader, loader.special, lambda_con=LAMBDA_CON, lambda_cap=LAMBDA_CAP, temperature=0.07,
                    contrastive_batch_size=CHUNK, autocast_dtype=torch.bfloat16)
    fp32 = straight(model, val_data)
    assert bf16["num_samples"] == fp32["num_samples"] and bf16["num_tokens"] == fp32["num_tokens"]
    assert bf16["caption"] != fp32["caption"]  # autocast did act
    assert bf16["caption"] == pytest.approx(fp32["caption"], rel=2e-2)
    assert bf16["contrastive"] == pytest.approx(fp32["contrastive"], rel=5e-2)
