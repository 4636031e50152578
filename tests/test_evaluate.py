"""`evaluate_run` in one pass: one loader over the split, each image encoded once, and every
number the same as when losses, retrieval and captions are computed from separate passes."""

import math

import numpy as np
import pytest
import reference_losses as reference
import torch
from ckpt_helpers import save_checkpoint
from PIL import Image
from shardset import VOCAB_SIZE, jpeg_bytes, make_shardset

import grr_train.eval.evaluate as evaluate
from grr_data.format.layout import SpecialIds
from grr_data.loader import make_loader
from grr_train.eval.retrieval import group_by_image, recall_at_k
from grr_train.infer.generate import DecodeOptions, generate_from_tokens
from grr_train.model import build_model, get_config
from grr_train.runs import weights

SPECIAL = SpecialIds.for_vocab(VOCAB_SIZE)
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


@pytest.fixture(scope="module")
def data_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # 7 samples, 3 distinct images: captions of one image share its JPEG, as in MSCOCO
    images = [jpeg_bytes(Image.fromarray(np.full((288, 320, 3), COLOURS[i % 3], np.uint8))) for i in range(7)]
    data = make_shardset(root / "shards", shard_sizes=(4, 3), split="val", images=images)
    torch.manual_seed(0)
    cfg = get_config("grr-tiny", vocab_size=VOCAB_SIZE)
    model = build_model(cfg)
    meta = {"step": 3, "epoch": 0, "world_size": 1, "model_config": cfg.to_dict(),
            "train_config": {"recipe": "pretrain", "lambda_con": 0.6, "lambda_cap": 1.7, "precision": "fp32",
                             "val_contrastive_batch_size": 2},
            "special": SPECIAL.to_dict()}
    save_checkpoint(root / "run", model, {}, meta, keep=1)
    return data, root / "run"


def words(ids) -> str:
    return " ".join(f"w{t}" for t in ids)


def test_one_pass_reads_and_encodes_each_image_once(data_and_run, monkeypatch):
    data, run = data_and_run
    loaders, encoded = [], []

    def counting_loader(*args, **kwargs):
        loaders.append(make_loader(*args, **kwargs))
        return loaders[-1]

    real_load_model = evaluate.load_model

    def counting_model(*args, **kwargs):
        model, info = real_load_model(*args, **kwargs)
        model.vit.register_forward_hook(lambda _m, inputs, _out: encoded.append(inputs[0].shape[0]))
        return model, info

    monkeypatch.setattr(evaluate, "make_loader", counting_loader)
    monkeypatch.setattr(evaluate, "load_model", counting_model)
    result = evaluate.evaluate_run(run, data, "val", batch_size=3, decode_words=words,
                                   decode_options=DecodeOptions(beams=2, max_len=4), num_workers=0)
    assert len(loaders) == 1
    assert sum(encoded) == 7  # every sample's image once, none a second time for retrieval or captions
    assert result["num_samples"] == 7 and result["retrieval"]["num_images"] == 3
    assert result["captioning"]["num_images"] == 3


def test_one_pass_equals_separate_passes(data_and_run):
    data, run = data_and_run
    options = DecodeOptions(beams=2, max_len=4)
    result = evaluate.evaluate_run(run, data, "val", batch_size=3, contrastive_batch_size=7, decode_words=words,
                                   decode_options=options, num_workers=0)

    model, _ = weights.load_model(run)
    batches = list(make_loader(data, split="val", batch_size=7, shuffle=False, num_workers=0, with_keys=True))
    assert len(batches) == 1 and bool(batches[0]["real"].all())
    images, ids = batches[0]["images"], batches[0]["ids"]
    with torch.no_grad():
        image_embed, image_tokens = model.encode_image(images)
        text_embed = model.encode_text(ids)
        logits = model(images, ids).logits
    # the paper's numbers against the reference losses, with the run's own weights 0.6 and 1.7
    targets = ids[:, 1:]
    num_tokens = int(reference.counted(targets, SPECIAL.ignored_targets).sum())
    caption = float(reference.caption_sum(logits, targets, SPECIAL.ignored_targets)) / num_tokens
    contrastive = float(reference.contrastive(image_embed, text_embed, 0.07))  # one chunk of all 7
    assert result["num_tokens"] == num_tokens and result["num_contrastive_dropped"] == 0
    assert (result["lambda_con"], result["lambda_cap"]) == (0.6, 1.7)
    assert result["caption"] == pytest.approx(caption, rel=1e-5)
    assert result["contrastive"] == pytest.approx(contrastive, rel=1e-5)
    assert result["loss"] == pytest.approx(0.6 * contrastive + 1.7 * caption, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(caption), rel=1e-5)

    text_to_image, first = group_by_image([evaluate.image_hash(img) for img in images])
    expected = recall_at_k(image_embed[first], text_embed, text_to_image)
    assert result["retrieval"] == expected
    generated = [words(w) for w in generate_from_tokens(model, image_tokens[first], SPECIAL, options)]
    assert [ex["generated"] for ex in result["captioning"]["examples"]] == generated
    assert [ex["key"] for ex in result["captioning"]["examples"]] == [batches[0]["keys"][i] for i in first]


def test_a_set_from_another_tokenizer_of_the_same_size_is_refused(data_and_run, tmp_path):
    # Same vocabulary size and special ids, other pieces: the fingerprints differ (issue 10, item 3).
    import json
    import shutil

    data, run = data_and_run
    meta_path = run / "checkpoints" / "latest"
    other = tmp_path / "shards"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    recorded = {**manifest["tokenizer"], "files_sha256": {"spiece.model": "0" * 64}}
    manifest["tokenizer"] = {**manifest["tokenizer"], "files_sha256": {"spiece.model": "1" * 64}}
    (other / "manifest.json").write_text(json.dumps(manifest))
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    ckpt_dir = run2 / "checkpoints" / (run2 / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    meta["tokenizer"] = recorded
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))
    import hashlib  # the edited meta.json gets its new checksum, as a save would have written

    sums = (ckpt_dir / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256((ckpt_dir / "meta.json").read_bytes()).hexdigest()
    (ckpt_dir / "SHA256SUMS").write_text("\n".join(f"{digest}  meta.json" if line.endswith("  meta.json") else line
                                                   for line in sums) + "\n")
    assert meta_path.exists()
    with pytest.raises(ValueError, match="would\\s+mean other words"):
        evaluate.evaluate_run(run2, other, "val", batch_size=4, contrastive_batch_size=2)
    # the explicit override lets it through
    evaluate.evaluate_run(run2, other, "val", batch_size=4, contrastive_batch_size=2, allow_other_tokenizer=True)


def test_a_contrastive_batch_above_the_samples_is_capped_with_a_warning(data_and_run, capsys):
    """As training caps its batches on a small set: 5 asked for, 3 samples evaluated -> 3, said once."""
    data, run = data_and_run
    capped = evaluate.evaluate_run(run, data, "val", batch_size=4, contrastive_batch_size=5, max_samples=3)
    warning = capsys.readouterr().err
    assert "warning: contrastive batch 5 (asked for) is more than the 3 samples evaluated from split 'val'" in warning
    assert "using 3" in warning
    exact = evaluate.evaluate_run(run, data, "val", batch_size=4, contrastive_batch_size=3, max_samples=3)
    assert capped["contrastive_batch_size"] == 3 and capped["contrastive"] == exact["contrastive"]
    assert "warning" not in capsys.readouterr().err
