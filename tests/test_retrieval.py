"""recall@k on constructed similarities whose ranks are worked out by hand."""

import pytest
import torch

from grr_train.eval.retrieval import group_by_image, recall_at_k

# Rows: 5 captions; columns: similarity to 3 images. Captions 0, 1 show image 0, caption 2
# image 1, captions 3, 4 image 2. With identity image embeddings these rows are the
# text embeddings and text @ image.T is this matrix.
SIMS = torch.tensor(
    [
        [0.9, 0.1, 0.2],  # image 0: rank 0
        [0.3, 0.8, 0.1],  # image 0: rank 1 (image 1 ahead)
        [0.5, 0.4, 0.6],  # image 1: rank 2
        [0.7, 0.2, 0.6],  # image 2: rank 1
        [0.1, 0.2, 0.95],  # image 2: rank 0
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def test_group_by_image_keeps_first_appearance_order():
    text_to_image, first = group_by_image(["b", "a", "b", "c", "a"])
    assert text_to_image.tolist() == [0, 1, 0, 2, 1]
    assert first == [0, 1, 3]


def test_recall_with_several_captions_per_image():
    out = recall_at_k(torch.eye(3), SIMS, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert out["num_images"] == 3 and out["num_texts"] == 5
    # text -> image ranks 0, 1, 2, 1, 0
    assert out["t2i_r1"] == pytest.approx(40.0)
    assert out["t2i_r2"] == pytest.approx(80.0)
    assert out["t2i_r3"] == pytest.approx(100.0)
    # image 0: best caption (0.9) first; image 1: its caption 0.4 behind caption 1's 0.8;
    # image 2: caption 4 (0.95) first. Ranks 0, 1, 0.
    assert out["i2t_r1"] == pytest.approx(200.0 / 3)
    assert out["i2t_r2"] == pytest.approx(100.0)


def test_chunking_does_not_change_the_answer():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(15, 4), dim=1)
    t2i = torch.tensor([i % 7 for i in range(15)])
    assert recall_at_k(img, txt, t2i, chunk=2) == recall_at_k(img, txt, t2i, chunk=1000)


def test_ties_count_against_the_model():
    out = recall_at_k(torch.zeros(3, 4), torch.zeros(5, 4), TEXT_TO_IMAGE, ks=(1, 3, 4, 5))
    # every image sees all wrong captions tie with its own: ranks 3, 4, 3
    assert out["i2t_r1"] == 0.0 and out["i2t_r3"] == 0.0
    assert out["i2t_r4"] == pytest.approx(200.0 / 3) and out["i2t_r5"] == 100.0
    # every caption sees both other images tie with its own: rank 2
    assert out["t2i_r1"] == 0.0 and out["t2i_r3"] == 100.0


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(torch.eye(3), SIMS[:3], torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(torch.eye(3), SIMS, torch.tensor([0, 1]))


def test_eval_counts_each_sample_once_and_groups_by_image_pixels():
    from grr_train.eval.evaluate import RealSamples, image_hash

    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    batches = [
        {"images": images[:3], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["a", "b", "c"],
         "real": torch.tensor([True, True, True])},
        # the loader pads its last batch with the first samples again
        {"images": images[[3, 0, 1]], "ids": torch.zeros(3, 65, dtype=torch.long), "keys": ["d", "a", "b"],
         "real": torch.tensor([True, False, False])},
    ]
    seen = [b["keys"] for b in RealSamples(batches)]
    assert seen == [["a", "b", "c"], ["d"]]
    assert [b["keys"] for b in RealSamples(batches, max_samples=2)] == [["a", "b"]]
    assert image_hash(images[0]) == image_hash(images[0].clone()) != image_hash(images[1])
