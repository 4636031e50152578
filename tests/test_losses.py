"""Tests of the CoCa losses against hand computations, and of the DDP-gathered contrastive loss."""

import math
import os
import socket

import pytest
import reference_losses as reference
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from grr_train.train.losses import caption_loss, coca_loss, contrastive_loss, perplexity


class Special:  # the part of grr_data.format.layout.SpecialIds the losses use
    ignored_targets = (8, 0, 9)  # BOS, PAD, CLS for a vocabulary of 10


def unit(x):
    return F.normalize(x, dim=-1)


def eq2_by_hand(x, y, s):
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        row = [math.exp(float(x[i] @ y[j]) / s) for j in range(n)]
        col = [math.exp(float(y[i] @ x[j]) / s) for j in range(n)]
        total += math.log(row[i] / sum(row)) + math.log(col[i] / sum(col))
    return -total / n


def test_contrastive_loss_is_paper_eq2():
    torch.manual_seed(0)
    x, y = unit(torch.randn(5, 8)), unit(torch.randn(5, 8))
    assert contrastive_loss(x, y, 0.07).item() == pytest.approx(eq2_by_hand(x, y, 0.07), rel=1e-5)
    assert contrastive_loss(x, y, 1.0).item() == pytest.approx(eq2_by_hand(x, y, 1.0), rel=1e-5)


def test_contrastive_loss_perfect_and_uniform():
    eye = torch.eye(4)
    assert contrastive_loss(eye, eye, 0.001).item() == pytest.approx(0.0, abs=1e-6)
    same = unit(torch.ones(4, 3))
    assert contrastive_loss(same, same, 0.07).item() == pytest.approx(2 * math.log(4), rel=1e-6)


def test_caption_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])  # (1, 3, V=3)
    targets = torch.tensor([[0, 1, 2]])

    def nll(row, t):
        return -math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))

    by_hand = [nll([2, 0, 0], 0), nll([0, 1, 0], 1), nll([0, 0, 3], 2)]
    assert caption_loss(logits, targets, ()).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    # target id 2 is ignored: only the first two count
    assert caption_loss(logits, targets, (2,), "sum").item() == pytest.approx(sum(by_hand[:2]), rel=1e-6)
    assert caption_loss(logits, targets, (2,), "mean").item() == pytest.approx(sum(by_hand[:2]) / 2, rel=1e-6)
    assert caption_loss(logits, targets, (0, 1, 2)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        caption_loss(logits, targets, (), "max")


class Out:
    def __init__(self, image_embed, text_embed, logits):
        self.image_embed, self.text_embed, self.logits = image_embed, text_embed, logits


LAMBDA_CON, LAMBDA_CAP = 0.7, 1.3  # distinct, not 1: a dropped or swapped weight changes the value


def test_coca_loss_is_eq6_with_its_weights_and_gradients():
    torch.manual_seed(0)
    ids = torch.tensor([[8, 3, 4, 1, 0, 9, 0], [8, 5, 1, 0, 0, 9, 0]])  # BOS w.. EOS PAD CLS PAD
    image = unit(torch.randn(2, 4)).requires_grad_()
    text = unit(torch.randn(2, 4)).requires_grad_()
    logits = torch.randn(2, 6, 10, requires_grad=True)
    parts = coca_loss(Out(image, text, logits), ids, Special(), lambda_con=LAMBDA_CON, lambda_cap=LAMBDA_CAP,
                      temperature=0.07)
    targets = ids[:, 1:]
    keep = (targets != 8) & (targets != 0) & (targets != 9)
    assert parts["num_tokens"].item() == int(keep.sum()) == 5
    # by hand: eq. 2 in plain floats, eq. 3-4 from log-softmax rows
    con = eq2_by_hand(image.detach(), text.detach(), 0.07)
    log_probs = logits.detach().log_softmax(dim=-1)
    cap_sum = -sum(float(log_probs[b, t, targets[b, t]]) for b, t in keep.nonzero().tolist())
    assert parts["contrastive"].item() == pytest.approx(con, rel=1e-5)
    assert parts["caption_sum"].item() == pytest.approx(cap_sum, rel=1e-5)
    assert parts["caption"].item() == pytest.approx(cap_sum / 5, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.7 * con + 1.3 * cap_sum / 5, rel=1e-5)

    parts["loss"].backward()
    grads = [t.grad.clone() for t in (image, text, logits)]
    for t in (image, text, logits):
        t.grad = None
    expected = (LAMBDA_CON * reference.contrastive(image, text, 0.07)
                + LAMBDA_CAP * reference.caption_sum(logits, targets, Special.ignored_targets) / 5)
    expected.backward()
    for got, t, name in zip(grads, (image, text, logits), ("image_embed", "text_embed", "logits"), strict=True):
        torch.testing.assert_close(got, t.grad.float(), rtol=1e-5, atol=1e-7, msg=name)


def test_perplexity():
    assert perplexity(torch.tensor(6.0), torch.tensor(3)) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="zero"):
        perplexity(0.0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, images, texts, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = images.shape[0] // world
        x = images[rank * b : (rank + 1) * b].clone().requires_grad_()
        y = texts[rank * b : (rank + 1) * b].clone().requires_grad_()
        loss = contrastive_loss(x, y, 0.1)
        loss.backward()
        results[rank] = (loss.detach(), x.grad, y.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_contrastive_loss_equals_full_batch():
    torch.manual_seed(0)
    world, n = 2, 6
    images, texts = unit(torch.randn(n, 8)), unit(torch.randn(n, 8))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(world, _free_port(), images, texts, results), nprocs=world, join=True)

    x, y = images.clone().requires_grad_(), texts.clone().requires_grad_()
    full = contrastive_loss(x, y, 0.1)
    full.backward()
    losses = torch.stack([results[r][0] for r in range(world)])
    torch.testing.assert_close(losses.mean(), full.detach())  # DDP averages the ranks
    # each rank's gradient is that of the sum of the ranks' losses; DDP divides it by the world size
    grad_x = torch.cat([results[r][1] for r in range(world)]) / world
    grad_y = torch.cat([results[r][2] for r in range(world)]) / world
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_y, y.grad)
