"""Validation counts every sample of a split exactly once, whatever the batch size and the number
of ranks: the loader's padding repeats (the last global step) are left out of every sum, and the
contrastive chunks are cut from the real samples in plan order (grr_train.validate)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grr_data.loader import make_loader
from grr_train.evaluate import RealSamples
from grr_train.losses import caption_loss, contrastive_loss
from grr_train.model import build_model, get_config
from grr_train.validate import validate

sys.path.insert(0, str(Path(__file__).parent))
from shardset import make_shardset  # noqa: E402

NUM_SAMPLES, CHUNK = 7, 3


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("val7"), (NUM_SAMPLES,), split="val")


def tiny_model():
    torch.manual_seed(0)
    return build_model(get_config("grr-tiny", dropout=0.0, vocab_size=1000)).eval()


def run_validate(model, data, batch_size, rank=0, world_size=1):
    loader = make_loader(data, split="val", batch_size=batch_size, kind="cpu", rank=rank, world_size=world_size,
                         shuffle=False, num_workers=0)
    return validate(model, loader, loader.special, lambda_con=2.0, lambda_cap=1.0, temperature=0.07,
                    contrastive_batch_size=CHUNK)


@torch.no_grad()
def straight(model, data) -> dict:
    """The metrics computed by hand over the 7 samples in one batch (no padding involved)."""
    loader = make_loader(data, split="val", batch_size=NUM_SAMPLES, kind="cpu", shuffle=False, num_workers=0)
    (batch,) = list(loader)
    special = loader.special
    out = model(batch["images"], batch["ids"])
    targets = batch["ids"][:, 1:]
    caption_sum = float(caption_loss(out.logits, targets, special.ignored_targets, reduction="sum"))
    tokens = int((~torch.isin(targets, torch.tensor(special.ignored_targets))).sum())
    chunks = [float(contrastive_loss(out.image_embed[s : s + CHUNK], out.text_embed[s : s + CHUNK], 0.07,
                                     gather=False)) for s in range(0, NUM_SAMPLES - CHUNK + 1, CHUNK)]
    return {"caption": caption_sum / tokens, "num_tokens": tokens, "contrastive": sum(chunks) / len(chunks),
            "num_samples": NUM_SAMPLES, "num_contrastive_dropped": NUM_SAMPLES % CHUNK}


def assert_same(result: dict, expected: dict) -> None:
    assert result["num_samples"] == expected["num_samples"]
    assert result["num_tokens"] == expected["num_tokens"]
    assert result["num_contrastive_dropped"] == expected["num_contrastive_dropped"]
    assert result["caption"] == pytest.approx(expected["caption"], rel=1e-5)
    assert result["contrastive"] == pytest.approx(expected["contrastive"], rel=1e-5)
    loss = 2.0 * expected["contrastive"] + expected["caption"]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("batch_size", [4, 2, 7])
def test_one_rank_counts_each_sample_once(val_data, batch_size):
    model = tiny_model()
    assert_same(run_validate(model, val_data, batch_size), straight(model, val_data))


def _worker(rank: int, world_size: int, data: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        results = {b: run_validate(model, data, b, rank, world_size) for b in BATCH_SIZES_2_RANKS}
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# Batch 4: rank 1's only batch holds 3 real samples and a repeat. Batch 3: in the last step rank 0
# holds 1 real sample and rank 1 none. One process group for both (starting one costs seconds).
BATCH_SIZES_2_RANKS = (4, 3)


def test_two_ranks_together_count_each_sample_once(val_data, tmp_path):
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, str(val_data), str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    expected = straight(tiny_model(), val_data)
    for rank in range(2):  # every rank reports the split's numbers
        results = json.loads(Path(f"{out}.{rank}").read_text())
        for batch_size in BATCH_SIZES_2_RANKS:
            assert_same(results[str(batch_size)], expected)


def test_eval_keeps_real_samples_only_and_stops_at_max_samples():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    batches = [
        {"images": images[:3], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["a", "b", "c"], "num_real": 3},
        # the loader pads its last batch with the first samples again
        {"images": images[[3, 0, 1]], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["d", "a", "b"],
         "num_real": 1},
    ]
    seen = [(b["keys"], b["num_real"], b["images"].shape[0]) for b in RealSamples(batches)]
    assert seen == [(["a", "b", "c"], 3, 3), (["d"], 1, 1)]
    assert [b["keys"] for b in RealSamples(batches, max_samples=2)] == [["a", "b"]]
    assert [b["keys"] for b in RealSamples(batches, max_samples=4)] == [["a", "b", "c"], ["d"]]
