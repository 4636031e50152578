"""The training step's maths against independent references (issue 21): eq. 6 with its two weights
and the contrastive term averaged over micro-batches, in the gradients the optimizer receives; the
trainer's AdamW step (its weight decay, betas, learning rate and clipping) against
torch.optim.AdamW from a known state; a bf16 autocast step on the CPU.

Expected values come from tests/reference_losses.py and torch's own (non-fused) AdamW, never from
grr_train.train.losses or grr_train.train.step. Weights and rates are distinct and not 0 or 1."""

import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import reference_losses as reference
import torch
from grad_capture import captured_grads

from grr_data.format.layout import SpecialIds, build_layout
from grr_train.model import build_model, get_config
from grr_train.runtime.parallel import unwrap
from grr_train.runtime.precision import autocast_dtype
from grr_train.train.config import TrainConfig
from grr_train.train.step import StepSettings, TrainStep

sys.path.insert(0, str(Path(__file__).parent))
from shardset import VOCAB_SIZE  # noqa: E402
from test_train import make_data  # noqa: E402

V = 64
SPECIAL = SpecialIds.for_vocab(V)
LAMBDA_CON, LAMBDA_CAP, TEMPERATURE = 0.7, 1.3, 0.07


def tiny_model(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=dropout))


def micro_batch(word_counts, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = [build_layout(torch.randint(2, SPECIAL.bos, (n,), generator=g).tolist(), SPECIAL)[0] for n in word_counts]
    return {"images": torch.randn(len(rows), 3, 288, 288, generator=g), "ids": torch.tensor(rows)}


def test_step_gradients_are_eq6_with_the_contrastive_term_averaged_over_micro_batches():
    """Two micro-batches of different caption lengths: the gradient is that of
    0.7 x mean_k(contrastive_k) + 1.3 x (sum_k caption_sum_k) / (all counted tokens)."""
    micro = [micro_batch([3, 17], seed=1), micro_batch([9, 30], seed=2)]
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, optimizer, SPECIAL, StepSettings(LAMBDA_CON, LAMBDA_CAP, 1e9, TEMPERATURE),
                     torch.device("cpu"))
    with captured_grads(model) as captured:
        metrics = step(micro)

    contrastives, caption_sums, tokens = [], [], 0
    for b in micro:
        out = reference_model(b["images"], b["ids"])
        contrastives.append(reference.contrastive(out.image_embed, out.text_embed, TEMPERATURE))
        caption_sums.append(reference.caption_sum(out.logits, b["ids"][:, 1:], SPECIAL.ignored_targets))
        tokens += int(reference.counted(b["ids"][:, 1:], SPECIAL.ignored_targets).sum())
    contrastive = sum(contrastives) / len(micro)
    caption = sum(caption_sums) / tokens
    loss = LAMBDA_CON * contrastive + LAMBDA_CAP * caption
    assert metrics["num_tokens"] == tokens
    assert metrics["contrastive"] == pytest.approx(contrastive.item(), rel=1e-5)
    assert metrics["caption"] == pytest.approx(caption.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert captured.keys() == {n for n, _ in reference_model.named_parameters()}
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(captured[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    norm = torch.stack([p.grad.double().norm() for p in reference_model.parameters()]).norm()
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


# ---- the trainer's optimizer step --------------------------------------------------------------

# AdamW settings a dropped or swapped one would change: betas not the defaults, weight decay large
# enough to move a weight by lr x 0.3 x w (2.4e-3 relative at lr 8e-3: far above float rounding),
# clipping well below the tiny model's gradient norm (~5-15) so it always acts.
ADAMW = dict(lr_max=8e-3, lr_min=1e-4, warmup_steps=2, beta1=0.8, beta2=0.95, weight_decay=0.3, grad_clip=0.25)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Two optimizer steps of a tiny run (2 micro-batches each), recording before each step the
    weights and optimizer state, and the gradients the step computed (before clipping)."""
    import grr_train.train.trainer as trainer_module

    root = tmp_path_factory.mktemp("adamw")
    data = make_data(root / "data", (8,), None)
    cfg = replace(TrainConfig(), preset="grr-tiny", data=str(data), per_device_batch_size=2, global_batch_size=4,
                  epochs=1, max_steps=2, dropout=0.0, lambda_con=LAMBDA_CON, lambda_cap=LAMBDA_CAP, num_workers=0,
                  loader="cpu", val_split="none", checkpoint_every=1, keep_checkpoints=2, tensorboard=False,
                  precision="fp32", compile="off", **ADAMW)
    records = []
    real_train_step = trainer_module.Trainer.train_step

    def recording(self, micro_batches):
        model = unwrap(self.model)
        record = {"weights": {n: t.clone() for n, t in model.state_dict().items()},
                  "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        with captured_grads(model) as captured:
            metrics = real_train_step(self, micro_batches)
        records.append({**record, "grads": captured, "metrics": metrics})
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Trainer, "train_step", recording)
        trainer_module.run_training(cfg, root / "run")
    return root / "run", records


def reference_adamw_step(record: dict, lr: float):
    """The update torch.optim.AdamW (for-loop implementation) makes from the recorded state, after
    clipping the recorded gradients to ADAMW's grad_clip as torch.nn.utils.clip_grad_norm_ documents."""
    model = build_model(get_config("grr-tiny", vocab_size=VOCAB_SIZE, dropout=0.0))
    model.load_state_dict(record["weights"])
    params = dict(model.named_parameters())
    norm = torch.stack([g.double().norm() for g in record["grads"].values()]).norm()
    scale = min(1.0, ADAMW["grad_clip"] / (float(norm) + 1e-6))
    for name, g in record["grads"].items():
        params[name].grad = g.clone() * scale
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(ADAMW["beta1"], ADAMW["beta2"]),
                                  weight_decay=ADAMW["weight_decay"], eps=1e-8, foreach=False, fused=False)
    if record["optimizer"]["state"]:
        optimizer.load_state_dict(record["optimizer"])  # the moments; the settings stay ours, not the run's
        for group in optimizer.param_groups:
            group.update(lr=lr, betas=(ADAMW["beta1"], ADAMW["beta2"]), weight_decay=ADAMW["weight_decay"], eps=1e-8)
    optimizer.step()
    return model, optimizer, float(norm), scale


@pytest.mark.parametrize("step", [1, 2])
def test_the_trainers_adamw_step_is_torchs_with_the_runs_settings(two_steps, step):
    """From the recorded weights, moments and gradients of step `step`, torch's AdamW with the
    run's lr, betas and weight decay, after clipping, gives the checkpoint's weights and moments;
    the logged grad_norm is the norm before clipping. (At step 1 Adam's update does not depend on
    the gradient's scale, so clipping shows in the moments; at step 2 in the weights too.)"""
    from grr_train.runs import checkpoint as ckpt
    from grr_train.runs import weights

    run, records = two_steps
    record = records[step - 1]
    lr = ADAMW["lr_max"] * step / ADAMW["warmup_steps"]  # linear warm-up over 2 steps: 4e-3, then 8e-3
    assert record["metrics"]["lr"] == pytest.approx(lr, rel=1e-12)
    model, optimizer, norm, scale = reference_adamw_step(record, lr)
    assert scale < 0.1, "the test needs clipping to act"
    assert record["metrics"]["grad_norm"] == pytest.approx(norm, rel=1e-5)  # before clipping

    folder = ckpt.checkpoint_folder(run, step)
    saved = build_model(get_config("grr-tiny", vocab_size=VOCAB_SIZE, dropout=0.0))
    weights.load_weights(saved, folder)
    saved_state = ckpt.load_state(folder)["optimizer"]["state"]
    for index, (name, p) in enumerate(model.named_parameters()):
        before = record["weights"][name]
        assert not torch.equal(p.detach(), before), name  # every weight moved
        # the same gradients on both sides (AdamW's sign amplification has nothing to act on): only the
        # fused and for-loop implementations' rounding differs
        torch.testing.assert_close(saved.state_dict()[name], p.detach(), rtol=1e-6, atol=1e-8, msg=name)
        ours, theirs = saved_state[index], optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):  # exp_avg cancels to ~0 in places: tolerance from the tensor's scale
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6 * float(theirs[key].abs().max()),
                                       msg=f"{name} {key}")
        assert float(ours["step"]) == step


def test_weight_decay_of_the_run_shows_in_the_step(two_steps):
    """Guards the test above against a decay too small to see: without it, step 1's weights differ
    from the checkpoint's by far more than that test's tolerance."""
    from grr_train.runs import checkpoint as ckpt
    from grr_train.runs import weights

    run, records = two_steps
    record = records[0]
    saved = build_model(get_config("grr-tiny", vocab_size=VOCAB_SIZE, dropout=0.0))
    weights.load_weights(saved, ckpt.checkpoint_folder(run, 1))
    decay = ADAMW["weight_decay"]
    ADAMW["weight_decay"] = 0.0
    try:
        undecayed, *_ = reference_adamw_step(record, ADAMW["lr_max"] / 2)
    finally:
        ADAMW["weight_decay"] = decay
    name = "token_embed.weight"
    diff = (saved.state_dict()[name] - dict(undecayed.named_parameters())[name].detach()).abs().max()
    assert diff > 100 * (1e-8 + 1e-6 * float(saved.state_dict()[name].abs().max())), float(diff)


# ---- bf16 on the CPU ---------------------------------------------------------------------------

def test_a_bf16_training_step_on_the_cpu():
    """precision=bf16 on the CPU: the step runs under bf16 autocast (its losses differ from fp32's
    by bf16 rounding, not more), the weights and their gradients stay fp32, and the update is
    applied."""
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16  # what the trainer passes for precision=bf16
    micro = [micro_batch([5, 12], seed=3), micro_batch([7, 20], seed=4)]
    results = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        step = TrainStep(model, optimizer, SPECIAL, StepSettings(LAMBDA_CON, LAMBDA_CAP, 1e9, TEMPERATURE,
                                                                 autocast_dtype=dtype), torch.device("cpu"))
        with captured_grads(model) as captured:
            metrics = step(micro)
        assert metrics["finite"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(g.dtype == torch.float32 for g in captured.values())
        assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
        results[dtype] = metrics, captured
    (fp32, g32), (bf16, g16) = results[None], results[torch.bfloat16]
    assert bf16["caption"] != fp32["caption"]  # autocast acted
    for key in ("loss", "contrastive", "caption"):
        assert bf16[key] == pytest.approx(fp32[key], rel=3e-2), key
    assert bf16["num_tokens"] == fp32["num_tokens"]
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    cosine = float(torch.nn.functional.cosine_similarity(flat32, flat16, dim=0))
    assert cosine > 0.99, cosine
