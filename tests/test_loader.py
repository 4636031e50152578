"""The CPU loader's contract, the per-rank plan, resume and bad-sample handling (grr_data.loader)."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from shardset import jpeg_bytes, make_shardset, sample_number

from grr_data.format.layout import SEQ_LEN, SpecialIds
from grr_data.loader import Plan, make_loader
from grr_data.loader.base import MEAN, STD

SIZES = (10, 10, 5)  # 25 samples in 3 shards


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("photos"), SIZES)


def numbers(batches):
    return [[sample_number(r) for r in b["ids"]] for b in batches]


def test_contract_solid_colour(tmp_path):
    colours = [(200, 100, 50), (0, 255, 128), (30, 30, 30), (255, 255, 255)]
    images = [jpeg_bytes(Image.new("RGB", (300 + 40 * i, 288), c)) for i, c in enumerate(colours)]
    root = make_shardset(tmp_path, (4,), images=images)
    loader = make_loader(root, batch_size=4, kind="cpu", shuffle=False, num_workers=0)
    assert loader.name == "cpu" and len(loader) == 1
    assert loader.special == SpecialIds.for_vocab(1000)
    (batch,) = list(loader)
    assert batch["images"].shape == (4, 3, 288, 288) and batch["images"].dtype == torch.float32
    assert batch["ids"].shape == (4, SEQ_LEN) and batch["ids"].dtype == torch.int64
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for img, colour in zip(batch["images"], colours, strict=True):
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        # a solid JPEG decodes to within ~1 level of its colour
        assert (img - expected).abs().max() < 1.5 / 255 / min(STD)
    assert [sample_number(r) for r in batch["ids"]] == [0, 1, 2, 3]
    assert loader.skipped == {}


def test_dtype_and_keys(photos):
    loader = make_loader(
        photos, batch_size=8, kind="cpu", num_workers=0, dtype=torch.bfloat16, with_keys=True
    )
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.bfloat16
    assert batch["keys"] == [f"s{sample_number(r):06d}" for r in batch["ids"]]


@pytest.mark.parametrize("num_samples,batch_size,world_size", [(25, 4, 1), (25, 4, 3), (7, 4, 3), (24, 4, 2)])
def test_plan_covers_every_sample_once_plus_padding(num_samples, batch_size, world_size):
    plans = [Plan(num_samples, batch_size, world_size, r, seed=5) for r in range(world_size)]
    per_rank = [p.rank_batches(3) for p in plans]
    assert {b.shape for b in per_rank} == {(plans[0].num_batches, batch_size)}
    read = np.concatenate([b.reshape(-1) for b in per_rank])
    counts = np.bincount(read, minlength=num_samples)
    assert counts.min() >= 1
    padding = plans[0].num_padding
    assert counts.sum() == num_samples + padding
    # the repeats are the start of the epoch's permutation, taken cyclically
    perm = np.random.default_rng([5, 3]).permutation(num_samples)
    expected = np.bincount(np.resize(perm, padding), minlength=num_samples) + 1 if padding else 1
    assert (counts == expected).all()
    # num_real marks exactly the padding: the real samples of all batches are the permutation
    real = [b[j, : p.num_real(j)] for p, b in zip(plans, per_rank, strict=True) for j in range(len(b))]
    assert sorted(np.concatenate(real).tolist()) == list(range(num_samples))


def test_ranks_and_workers_partition_the_epoch(tmp_path):
    root = make_shardset(tmp_path, (9, 5))  # 2 shards, fewer than 3 ranks x 2 workers
    world = 3
    loaders = [
        make_loader(root, batch_size=2, kind="cpu", rank=r, world_size=world, seed=1, num_workers=2)
        for r in range(world)
    ]
    got = [numbers(list(lo)) for lo in loaders]
    assert [len(g) for g in got] == [len(loaders[0])] * world == [3] * world
    flat = sorted(n for g in got for b in g for n in b)
    plan = loaders[0].plan
    assert plan.num_padding == 4
    assert sorted(set(flat)) == list(range(14)) and len(flat) == 18
    # the plan, not the number of workers, decides each rank's batches
    assert got[1] == numbers(
        list(make_loader(root, batch_size=2, kind="cpu", rank=1, world_size=world, seed=1, num_workers=0))
    )
    assert got[1] == Plan(14, 2, world, 1, seed=1).rank_batches(0).tolist()


def test_epochs_differ_and_seed_repeats(photos):
    def order(epoch, seed=0, shuffle=True):
        lo = make_loader(photos, batch_size=5, kind="cpu", num_workers=0, seed=seed, shuffle=shuffle)
        lo.set_epoch(epoch)
        return [n for b in numbers(list(lo)) for n in b]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=1)
    assert sorted(order(1)) == list(range(25))
    assert order(0, shuffle=False) == list(range(25))


def test_resume_yields_exactly_the_rest(photos):
    full = make_loader(photos, batch_size=3, kind="cpu", num_workers=2, seed=2)
    full.set_epoch(1)
    reference = list(full)
    assert full.state_dict()["epoch"] == 2 and full.state_dict()["batches_done"] == 0

    first = make_loader(photos, batch_size=3, kind="cpu", num_workers=2, seed=2)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["batches_done"] == 4

    resumed = make_loader(photos, batch_size=3, kind="cpu", num_workers=1, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer calling set_epoch for the current epoch keeps the position
    rest = list(resumed)
    assert len(head) + len(rest) == len(reference) == 9
    for got, ref in zip(head + rest, reference, strict=True):
        assert torch.equal(got["ids"], ref["ids"]) and torch.equal(got["images"], ref["images"])
    assert resumed.state_dict()["epoch"] == 2

    other = make_loader(photos, batch_size=4, kind="cpu", num_workers=0, seed=2)
    with pytest.raises(ValueError, match="different plan"):
        other.load_state_dict(state)


def test_bad_samples_are_skipped_counted_and_replaced(tmp_path, caplog):
    good = [jpeg_bytes(Image.new("RGB", (320, 288), (10 * i, 0, 0))) for i in range(8)]
    images = list(good)
    images[1] = b"definitely not a jpeg"
    images[6] = good[6][: len(good[6]) // 2]  # truncated
    root = make_shardset(tmp_path, (4, 4), images=images)
    loader = make_loader(root, batch_size=4, kind="cpu", shuffle=False, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="grr.loader"):
        batches = list(loader)
    assert [b["images"].shape for b in batches] == [(4, 3, 288, 288)] * 2
    # a bad sample is replaced by the next good one of its batch (cyclically)
    assert numbers(batches) == [[0, 2, 2, 3], [4, 5, 7, 7]]
    assert torch.equal(batches[0]["images"][1], batches[0]["images"][2])
    assert loader.skipped == {"decode_error": 2}
    assert "shard-000000.tar s000001" in caplog.text and "shard-000001.tar s000006" in caplog.text


def test_whole_batch_bad_takes_next_good_sample(tmp_path):
    images = [jpeg_bytes(Image.new("RGB", (300, 288), (0, 10 * i, 0))) for i in range(6)]
    images[0] = images[1] = b"broken"
    root = make_shardset(tmp_path, (6,), images=images)
    batches = list(make_loader(root, batch_size=2, kind="cpu", shuffle=False, num_workers=0))
    assert numbers(batches) == [[2, 2], [2, 3], [4, 5]]


def test_inconsistent_set_is_refused(tmp_path):
    root = make_shardset(tmp_path, (3,), images=[jpeg_bytes(Image.new("RGB", (288, 288)))] * 3)
    with pytest.raises(ValueError, match="no split 'val'"):
        make_loader(root, split="val", kind="cpu")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["num_samples"] = 4
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-000000.idx"):
        make_loader(root, kind="cpu")
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="grr data shard"):
        make_loader(root, kind="cpu")


def test_draft_only_for_large_sources_and_close_to_full_decode():
    from skimage.data import astronaut

    from grr_data.loader.cpu import decode_image

    big = jpeg_bytes(Image.fromarray(astronaut()).resize((1200, 700)))  # >= 2x 288 both ways
    full, drafted = decode_image(big, draft=False).astype(float), decode_image(big, draft=True).astype(float)
    assert drafted.shape == full.shape == (288, 288, 3)
    assert 0 < np.abs(full - drafted).mean() < 3  # draft changes the result, a little
    small = jpeg_bytes(Image.fromarray(astronaut()).resize((500, 288)))
    assert np.array_equal(decode_image(small, draft=True), decode_image(small, draft=False))


def test_auto_picks_cpu_without_a_cuda_target(caplog):
    from grr_data.loader import pick_kind

    with caplog.at_level(logging.INFO, logger="grr.loader"):
        assert pick_kind("auto", "cpu") == "cpu"
    assert "picked cpu" in caplog.text
    with pytest.raises(ValueError, match="auto, dali or cpu"):
        pick_kind("gpu", "cpu")


def test_bench_loader_cli(photos):
    import typer
    from typer.testing import CliRunner

    import grr_cli.loader  # noqa: F401  (registers `loader` into bench_app)
    from grr_cli.groups import bench_app

    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    args = ["bench", "loader", str(photos), "--loader", "cpu", "--workers", "0", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--batches", "8"])
    assert result.exit_code == 0, result.output
    assert "loader cpu, device cpu:" in result.output and "images/s" in result.output and "cores" in result.output
    assert "8 batches" in result.output  # 7 batches an epoch: the bench goes on into the next


def test_sample_missing_a_member_is_skipped(tmp_path):
    from grr_data.format.records import ShardWriter, iter_tar_samples

    images = [jpeg_bytes(Image.new("RGB", (300, 288), (0, 0, 20 * i))) for i in range(4)]
    root = make_shardset(tmp_path, (4,), images=images)
    shard = root / "train" / "shard-000000.tar"
    samples = list(iter_tar_samples(shard))
    with ShardWriter(shard) as writer:  # rewrite the shard with sample 2's .ids left out
        for key, members in samples:
            writer.write(key, {e: d for e, d in members.items() if not (key == "s000002" and e == "ids")})
    loader = make_loader(root, batch_size=4, kind="cpu", shuffle=False, num_workers=0, with_keys=True)
    (batch,) = list(loader)
    assert batch["keys"] == ["s000000", "s000001", "s000003", "s000003"]
    assert loader.skipped == {"missing_member": 1}


def test_open_file_limit_is_respected(photos, monkeypatch):
    import grr_data.infra.store as store  # the descriptors' owner: store.RangeReader

    reference = numbers(list(make_loader(photos, batch_size=5, kind="cpu", num_workers=0)))
    monkeypatch.setattr(store, "MAX_OPEN", 1)
    loader = make_loader(photos, batch_size=5, kind="cpu", num_workers=0)
    assert numbers(list(loader)) == reference
    assert len(loader.shards._ranges._fds) == 1


def test_set_epoch_starts_a_new_epoch_from_its_first_batch(photos):
    fresh = make_loader(photos, batch_size=5, kind="cpu", num_workers=0)
    fresh.set_epoch(1)
    reference = numbers(list(fresh))
    loader = make_loader(photos, batch_size=5, kind="cpu", num_workers=0)
    it = iter(loader)
    next(it), next(it)
    it.close()  # a trainer leaving epoch 0 early
    assert loader.state_dict()["batches_done"] == 2
    loader.set_epoch(1)
    assert numbers(list(loader)) == reference


def test_batches_say_which_samples_are_real(tmp_path):
    root = make_shardset(tmp_path, (7,))
    seen = []
    for rank in range(2):
        loader = make_loader(root, batch_size=3, kind="cpu", rank=rank, world_size=2, shuffle=False, num_workers=0)
        for batch in loader:
            seen += [sample_number(r) for r in batch["ids"][batch["real"]]]
            num_real = loader.plan.num_real(loader.batches_done - 1)
            assert batch["real"].dtype == torch.bool and batch["real"].device.type == "cpu"
            assert batch["real"].tolist() == [i < num_real for i in range(3)]
    assert sorted(seen) == list(range(7))  # 12 slots, 5 of them repeats, each real sample once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_substitutes_are_not_real(tmp_path, num_workers):
    images = [jpeg_bytes(Image.new("RGB", (300, 288), (0, 0, 20 * i))) for i in range(7)]
    images[1] = b"broken"  # replaced by sample 0 of its batch (cyclically)
    images[4] = images[5] = b"broken"  # batch [4, 5] wholly bad: takes sample 6 from the next batch
    root = make_shardset(tmp_path, (7,), images=images)
    loader = make_loader(root, batch_size=2, kind="cpu", shuffle=False, num_workers=num_workers, with_keys=True)
    batches = list(loader)
    assert numbers(batches) == [[0, 0], [2, 3], [6, 6], [6, 0]]
    assert [b["real"].tolist() for b in batches] == [[True, False], [True, True], [False, False], [True, False]]
    real_keys = [k for b in batches for k, r in zip(b["keys"], b["real"].tolist(), strict=True) if r]
    assert real_keys == ["s000000", "s000002", "s000003", "s000006"]  # each usable sample once


def test_preprocess_image_is_what_the_loader_gives(tmp_path):
    from grr_data.loader import preprocess_image

    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 640, 3), dtype=np.uint8))
    images = [jpeg_bytes(Image.new("RGB", (320, 288), (10, 200, 90))), jpeg_bytes(big)]
    root = make_shardset(tmp_path / "set", (2,), images=images)
    # draft off: the loader's full decode, which preprocess_image always does
    (batch,) = list(make_loader(root, batch_size=2, kind="cpu", shuffle=False, num_workers=0, draft=False))
    for jpg, expected in zip(images, batch["images"], strict=True):
        assert torch.equal(preprocess_image(jpg), expected)
    path = tmp_path / "big.jpg"
    path.write_bytes(images[1])
    assert torch.equal(preprocess_image(path), batch["images"][1])
    assert preprocess_image(str(path), dtype=torch.bfloat16).dtype == torch.bfloat16
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not-an-image.jpg"):
        preprocess_image(bad)
    with pytest.raises(ValueError, match="missing.jpg"):
        preprocess_image(tmp_path / "missing.jpg")


def test_an_epoch_is_a_whole_number_of_optimizer_steps():
    # 10 samples, batch 2, 1 rank, accumulation 4: 5 batches padded to 8, every sample once,
    # the 6 repeats (from the permutation's start) all in the last optimizer step.
    plan = Plan(10, 2, batch_multiple=4, seed=3)
    assert plan.num_batches == 8 and plan.num_padding == 6
    order = plan.epoch_order(0)
    assert sorted(order[:10].tolist()) == list(range(10))
    assert order[10:].tolist() == order[:6].tolist()
    # with two ranks the multiple holds per rank
    ranks = [Plan(10, 2, world_size=2, rank=r, batch_multiple=2) for r in range(2)]
    assert [p.num_batches for p in ranks] == [4, 4]
    with pytest.raises(ValueError, match="batch_multiple"):
        Plan(10, 2, batch_multiple=0)
