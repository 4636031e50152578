"""grr_train.api's open_clip shape: `create_model_and_transforms` and `get_tokenizer` give what code
written for open_clip calls (`encode_image`, `encode_text`, a PIL transform, a callable tokenizer),
so clip_benchmark's own zero-shot classification and retrieval run on a grr model unchanged.

clip_benchmark pulls open_clip and torchvision (which may replace torch), so it is not a dependency:
the tests that import it are skipped without it (install it beside grr with
`pip install --no-deps clip_benchmark scikit-learn`); `test_the_calls_clip_benchmark_makes` makes
the same calls itself, so the interface is checked everywhere."""

import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_shard import jpeg  # noqa: E402
from tiny_run import make_set, train_tiny_run  # noqa: E402

import grr_train.api as grr  # noqa: E402
from grr_train.infer.export import export_run  # noqa: E402

CLASSES = ["dog", "cat", "car"]
TEMPLATES = ["a photo of a {c}.", "a picture of a {c}."]
CAPTIONS = [["a dog on the grass", "a brown dog"], ["a cat on a mat", "a grey cat"], ["a red car", "a car"],
            ["a dog in the snow", "a white dog"], ["two cats", "a cat asleep"], ["a blue car", "a car parked"]]


class Labelled(Dataset):
    """Images with a class index, as a torchvision ImageFolder gives them (`classes` included)."""

    def __init__(self, files, transform):
        self.files, self.transform, self.classes = files, transform, CLASSES

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i])), i % len(CLASSES)


class Captioned(Labelled):
    """Images with their captions, as clip_benchmark's retrieval sets give them."""

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i])), CAPTIONS[i]


def retrieval_collate(batch):
    return torch.stack([image for image, _ in batch]), [texts for _, texts in batch]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(a tiny run, its export, six distinct photos)."""
    root = tmp_path_factory.mktemp("openclip")
    data, _ = make_set(root)
    run = train_tiny_run(data, root / "run")
    (root / "photos").mkdir()
    files = []
    for i in range(len(CAPTIONS)):
        files.append(root / "photos" / f"{i}.jpg")
        files[-1].write_bytes(jpeg(200 + i, size=(300, 260)))
    return run, export_run(run, root / "export"), files


@pytest.fixture(scope="module")
def shaped(made):
    model, _, preprocess = grr.create_model_and_transforms(made[0])
    return model, preprocess, grr.get_tokenizer(made[0])


# ---------------------------------------------------------------- independent references


def zero_shot_reference(reference, files):
    """(predicted class per image, true class per image) from GrrModel's own embeddings: each class's
    text embedding is the normalised mean of its templates' (what open_clip's zero-shot does)."""
    weights = torch.stack([F.normalize(reference.embed_texts([t.format(c=c) for t in TEMPLATES]).mean(0), dim=0)
                           for c in CLASSES], dim=1)  # (D, C)
    predicted = (reference.embed_images(files) @ weights).argmax(dim=1)
    return predicted, torch.tensor([i % len(CLASSES) for i in range(len(files))])


def recall_reference(reference, files, k):
    """(image retrieval R@k over texts, text retrieval R@k over images), with plain loops."""
    texts = [t for captions in CAPTIONS for t in captions]
    owner = [i for i, captions in enumerate(CAPTIONS) for _ in captions]
    scores = reference.embed_texts(texts) @ reference.embed_images(files).T  # (texts, images)
    image_hits = [owner[t] in scores[t].topk(k).indices.tolist() for t in range(len(texts))]
    text_hits = [any(owner[t] == i for t in scores[:, i].topk(k).indices.tolist()) for i in range(len(files))]
    return sum(image_hits) / len(image_hits), sum(text_hits) / len(text_hits)


# ---------------------------------------------------------------- the interface


def test_the_shape_open_clip_code_expects(made, shaped):
    model, preprocess, tokenizer = shaped
    run, _, files = made
    reference = grr.load(run)
    assert not model.training and isinstance(model, torch.nn.Module)
    image = Image.open(files[0])
    assert torch.equal(preprocess(image), reference.preprocess(files[0]))  # a PIL image: its file's tensor
    assert pickle.loads(pickle.dumps(preprocess))(image).shape == (3, 288, 288)  # DataLoader workers pickle it
    ids = tokenizer(["a dog", "a red car"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 65) and tokenizer.context_length == 65
    assert torch.equal(ids, torch.from_numpy(reference.tokenizer.encode_batch(["a dog", "a red car"])[0]))
    assert torch.equal(tokenizer("a dog"), ids[:1])
    with pytest.raises(ValueError, match="layout is 65 ids; context_length 77"):
        tokenizer(["a dog"], context_length=77)
    pixels = torch.stack([preprocess(Image.open(f)) for f in files[:3]])
    with torch.no_grad():
        images, texts = model.encode_image(pixels), model.encode_text(ids)
        assert torch.equal(model.encode_image(pixels, normalize=True), images)
        image_features, text_features, scale = model(pixels, ids)
    assert torch.equal(images, reference.embed_images(files[:3])) and torch.equal(texts, reference.embed_texts(
        ["a dog", "a red car"]))
    assert torch.equal(image_features, images) and torch.equal(text_features, texts)
    assert scale.item() == pytest.approx(1 / 0.07)


def test_an_export_gives_the_same_model_and_tokenizer(made, shaped):
    model, _, tokenizer = shaped
    from_export, _, _ = grr.create_model_and_transforms(made[1])
    pixels = grr.Preprocess()(made[2][0])[None]
    with torch.no_grad():
        assert torch.equal(from_export.encode_image(pixels), model.encode_image(pixels))
    assert torch.equal(grr.get_tokenizer(made[1])(["two cats"]), tokenizer(["two cats"]))


def test_the_calls_clip_benchmark_makes(made, shaped):
    """clip_benchmark's zero_shot_classifier, run_classification and retrieval `evaluate`, as it makes
    them (its code, without its imports): tokenizer(texts).to(device), encode_text / encode_image,
    F.normalize, a DataLoader over the transform."""
    model, preprocess, tokenizer = shaped
    files, device = made[2], "cpu"
    reference = grr.load(made[0])
    with torch.no_grad(), torch.autocast(device, enabled=False):
        weights = []
        for classname in CLASSES:
            texts = tokenizer([template.format(c=classname) for template in TEMPLATES]).to(device)
            embedding = F.normalize(model.encode_text(texts), dim=-1).mean(dim=0)
            weights.append(embedding / embedding.norm())
        classifier = torch.stack(weights, dim=1).to(device)
        logits, target = [], []
        for images, labels in DataLoader(Labelled(files, preprocess), batch_size=4):
            logits.append(100.0 * F.normalize(model.encode_image(images.to(device)), dim=-1) @ classifier)
            target.append(labels)
    predicted, truth = zero_shot_reference(reference, files)
    assert torch.equal(torch.cat(logits).argmax(dim=1), predicted) and torch.equal(torch.cat(target), truth)
    image_emb, text_emb, owner = [], [], []
    loader = DataLoader(Captioned(files, preprocess), batch_size=4, collate_fn=retrieval_collate)
    start = 0
    for images, captions in loader:
        with torch.no_grad():
            image_emb.append(F.normalize(model.encode_image(images), dim=-1))
            text_emb.append(F.normalize(model.encode_text(tokenizer([t for ts in captions for t in ts])), dim=-1))
        owner += [start + i for i, ts in enumerate(captions) for _ in ts]
        start += len(images)
    scores = torch.cat(text_emb) @ torch.cat(image_emb).T
    hits = [owner[t] in scores[t].topk(2).indices.tolist() for t in range(len(owner))]
    assert sum(hits) / len(hits) == recall_reference(reference, files, 2)[0]


# ---------------------------------------------------------------- clip_benchmark itself


@pytest.mark.slow
def test_clip_benchmark_zero_shot_classification(made, shaped, monkeypatch):
    zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                                   reason="clip_benchmark is not installed (it is not a grr dependency: "
                                          "pip install --no-deps clip_benchmark scikit-learn)")
    model, preprocess, tokenizer = shaped
    loader = DataLoader(Labelled(made[2], preprocess), batch_size=4)
    # clip_benchmark 1.6.2's `accuracy` calls float() on a one-element array, which NumPy 2.4 refuses
    # (TypeError): the same formula, read with .item(), stands in for that one helper
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zeroshot, "accuracy", accuracy)
    result = zeroshot.evaluate(model, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    print(f"clip_benchmark zero-shot on 6 images, 3 classes: {result}")
    predicted, truth = zero_shot_reference(grr.load(made[0]), made[2])
    assert result["acc1"] == pytest.approx((predicted == truth).float().mean().item())
    per_class = [((predicted == c) & (truth == c)).sum().item() / (truth == c).sum().item() for c in range(3)]
    assert result["mean_per_class_recall"] == pytest.approx(sum(per_class) / 3)


@pytest.mark.slow
def test_clip_benchmark_retrieval(made, shaped):
    retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval",
                                    reason="clip_benchmark is not installed (it is not a grr dependency: "
                                           "pip install --no-deps clip_benchmark scikit-learn)")
    model, preprocess, tokenizer = shaped
    loader = DataLoader(Captioned(made[2], preprocess), batch_size=4, collate_fn=retrieval_collate)
    result = retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 2])
    print(f"clip_benchmark retrieval on 6 images, 12 captions: {result}")
    reference = grr.load(made[0])
    for k in (1, 2):
        image_recall, text_recall = recall_reference(reference, made[2], k)
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall), k
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall), k
