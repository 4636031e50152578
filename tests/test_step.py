"""The training step (grr_train/train/step.py) and the speed wiring around it (parallel.py, losses.py):
accumulation is the maths of one larger batch, non-finite steps are skipped or refused, compiled
and activation-checkpointed models compute what the eager one does, the chunked caption loss is
cross-entropy, and the operator counter counts what a GPU launches."""

import math

import pytest
import torch
import torch.nn.functional as F
from grad_capture import captured_grads

import grr_train.train.losses as losses
from grr_data.format.layout import SpecialIds
from grr_train.model import build_model, get_config
from grr_train.runtime.parallel import checkpoint_blocks, compile_blocks
from grr_train.train.bench import synthetic_batch
from grr_train.train.dispatch_count import count_dispatched
from grr_train.train.step import StepSettings, TrainStep

V = 64


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=dropout))


def batch(n, seed=0):
    special = SpecialIds.for_vocab(V)
    images, ids = synthetic_batch(n, special, 288, torch.Generator().manual_seed(seed))
    return {"images": images, "ids": ids}


def run_step(model, micro_batches, lambda_con=2.0, lr=1e-3, stop=False):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(lambda_con, 1.3, 1e9, 0.07),
                     torch.device("cpu"))
    return step(micro_batches, stop_flag=stop)


def grads_after(model, micro_batches, lambda_con):
    with captured_grads(model) as captured:
        metrics = run_step(model, micro_batches, lambda_con=lambda_con, lr=1e-3)
    return metrics, captured


def test_accumulation_equals_one_larger_micro_batch_for_the_caption_loss():
    full = batch(4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    one, g_one = grads_after(tiny_model(), [full], lambda_con=0.0)
    two, g_two = grads_after(tiny_model(), halves, lambda_con=0.0)
    assert two["caption"] == pytest.approx(one["caption"], rel=1e-5)
    assert two["num_tokens"] == one["num_tokens"]
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    for name, g in g_one.items():
        torch.testing.assert_close(g_two[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_contrastive_loss_is_averaged_over_micro_batches():
    full = batch(4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    model = tiny_model().eval()
    with torch.no_grad():
        each = [losses.contrastive_loss(*_embeds(model, h), 0.07, gather=False).item() for h in halves]
    m = run_step(tiny_model(), halves, lr=1e-3)
    assert m["contrastive"] == pytest.approx(sum(each) / 2, rel=1e-5)


def _embeds(model, b):
    out = model(b["images"], b["ids"])
    return out.image_embed, out.text_embed


def test_a_non_finite_step_is_not_applied():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = batch(2)
    bad["images"] = bad["images"].clone()
    bad["images"][0, 0, 0, 0] = float("nan")
    m = run_step(model, [bad])
    assert not m["finite"] and math.isnan(m["loss"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_a_non_finite_step_leaves_the_optimizer_state_as_it_was():
    """The finite check gates fused AdamW on the device (found_inf): a flagged step changes no
    moment, and the step count it adds is taken off again, so the next good step is the one a
    step that was never taken would have been."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07), torch.device("cpu"))
    assert step.gate_on_device
    step([batch(2)])
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    bad = batch(2, seed=1)
    bad["images"] = bad["images"].clone()
    bad["images"][0, 0, 0, 0] = float("inf")
    assert not step([bad])["finite"]
    for n, p in model.named_parameters():
        for k, v in state[n].items():
            assert torch.equal(opt.state[p][k], v), (n, k)
    assert not hasattr(opt, "found_inf")  # the flag does not outlive the step


def test_launching_ahead_gives_the_same_steps_and_metrics():
    """Metrics read one step late (launch N+1, then read N) are those of reading each at once,
    and the weights end the same, bit for bit, a skipped step included."""
    data = [batch(2, seed=k) for k in range(4)]
    data[2]["images"] = data[2]["images"].clone()
    data[2]["images"][1, 0, 0, 0] = float("nan")

    def make():
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        return model, TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07),
                                torch.device("cpu"))

    model_now, now = make()
    at_once = [now([b]) for b in data]
    model_late, late = make()
    pending, read = None, []
    for b in data:
        launched = late.launch([b])
        if pending is not None:
            read.append(pending.result())
        pending = launched
    read.append(pending.result())
    assert repr(read) == repr(at_once)  # float reprs round-trip: equal bits (and nan equals nan)
    assert [m["finite"] for m in read] == [True, True, False, True]
    for (n, a), b in zip(model_now.named_parameters(), model_late.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_an_optimizer_without_found_inf_is_gated_on_the_host():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07), torch.device("cpu"))
    assert not step.gate_on_device
    bad = batch(2)
    bad["images"] = bad["images"].clone()
    bad["images"][0, 0, 0, 0] = float("nan")
    assert not step([bad])["finite"] and not opt.state
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert step([batch(2)])["finite"] and opt.state


def test_the_stop_flag_rides_on_the_step():
    assert run_step(tiny_model(), [batch(2)], stop=True)["stop_requested"]
    assert not run_step(tiny_model(), [batch(2)])["stop_requested"]


def test_activation_checkpointing_gives_the_same_results():
    b = [batch(2)]
    model, plain_model = tiny_model(dropout=0.1), tiny_model(dropout=0.1)
    assert checkpoint_blocks(model) == 6
    torch.manual_seed(5)  # dropout draws the same masks both times: the RNG is replayed in backward
    ckpt, g_ckpt = grads_after(model, b, 2.0)
    torch.manual_seed(5)
    plain, g_plain = grads_after(plain_model, b, 2.0)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_blocks_compute_what_eager_does():  # quick tier: inductor's cache makes reruns cheap
    b = [batch(2)]
    eager, g_eager = grads_after(tiny_model(), b, 2.0)
    model = tiny_model()
    compile_blocks(model)
    compiled, g_compiled = grads_after(model, b, 2.0)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_compiled[name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_caption_loss_is_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(losses, "CAPTION_CHUNK_ROWS", 5)  # several chunks and a ragged last one
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11)).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (3, 7))
    ignored = (0, 4)
    ours = losses.caption_loss(logits, targets, ignored, "sum")
    ours.backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    masked = targets.masked_fill((targets == 0) | (targets == 4), -100)
    ref = F.cross_entropy(logits.float().flatten(0, 1), masked.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours.float(), logits.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-7)


def test_the_counter_counts_fused_operators_once_and_no_views():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)

    def step():
        y = F.rms_norm(x, (8,), w, 1e-6).view(2, 16).t()  # a view and a transpose: no kernels
        (y * 2).sum().backward()

    ops = count_dispatched(step)
    assert ops["rms_norm"] == 1 and ops["rms_norm_backward"] == 1
    assert "view" not in ops and "t" not in ops and "pow" not in ops  # rms_norm's CPU insides unseen
    assert ops["mul"] >= 1 and ops["sum"] >= 1
    assert x.grad is not None and w.grad is not None


def test_the_trainer_step_dispatches_fewer_operators_than_before():
    # Per step of grr-tiny (batch 2, 1 micro-batch, fp32): the pre-issue-9 step dispatched 1,083
    # of these (float32 RoPE and RMSNorm round trips, a boolean mask converted per layer, the
    # for-loop clip); a regression that brings one back shows here.
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07), torch.device("cpu"))
    b = [batch(2)]
    step(b)  # the optimizer's state exists after the first step
    assert sum(count_dispatched(lambda: step(b)).values()) < 700


@pytest.mark.gpu
def test_no_host_sync_inside_the_micro_batch_loop():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(get_config("grr-tiny", vocab_size=V)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07,
                     autocast_dtype=torch.bfloat16), dev)
    micro = [{k: v.to(dev) for k, v in batch(2, s).items()} for s in range(3)]
    step(micro)
    scale = torch.tensor(1.0, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in micro:
            step._forward_backward(b["images"], b["ids"], scale, len(micro))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_a_launched_step_makes_no_host_sync():
    """The whole step, clipping, the finite check and the fused AdamW update included, is enqueued
    without waiting for the GPU; only result() waits."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(get_config("grr-tiny", vocab_size=V)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, SpecialIds.for_vocab(V), StepSettings(2.0, 1.0, 1.0, 0.07,
                     autocast_dtype=torch.bfloat16), dev)
    micro = [{k: v.to(dev) for k, v in batch(2, s).items()} for s in range(2)]
    first = step(micro)  # creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = step.launch(micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    m = pending.result()
    assert m["finite"] and math.isfinite(m["loss"]) and m["num_tokens"] == first["num_tokens"]
