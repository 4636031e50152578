"""The training step on 2 gloo processes (torch.multiprocessing.spawn, no torchrun), in the quick
tier: under DDP and under FSDP2 it computes the losses and the gradients (read as the optimizer
receives them, before any update) of one process holding both ranks' samples; and FSDP2's
mixed-precision policy gathers weights in the run's autocast dtype while gradients stay fp32.

Each global micro-batch k holds 4 pairs: rank r has pairs 2r, 2r+1 of it, the one process all 4
(the contrastive batch is the same 4 pairs, negatives gathered across ranks). Two micro-batches per
step, so DDP's no_sync and FSDP's set_requires_gradient_sync are in the step. Tolerance: 1e-5
relative on the losses and the gradient norm; each gradient tensor within 1e-4 of its largest
magnitude (summation order only, fp32: measured at most 4.8e-6, on poolers.queries)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grr_data.format.layout import SpecialIds, build_layout
from grr_train.model import build_model, get_config
from grr_train.runtime.distributed import DistInfo
from grr_train.runtime.parallel import parallelize
from grr_train.runtime.precision import autocast_context
from grr_train.train.step import StepSettings, TrainStep

V = 64
SPECIAL = SpecialIds.for_vocab(V)
SETTINGS = dict(lambda_con=0.7, lambda_cap=1.3, grad_clip=1e9, temperature=0.07)


def tiny_model():
    torch.manual_seed(0)
    return build_model(get_config("grr-tiny", vocab_size=V, dropout=0.0))


def global_micro_batches() -> list[dict]:
    """Two micro-batches of 4 pairs, captions of different lengths."""
    g = torch.Generator().manual_seed(7)
    out = []
    for counts in ((3, 20, 8, 12), (15, 5, 30, 2)):
        rows = [build_layout(torch.randint(2, SPECIAL.bos, (n,), generator=g).tolist(), SPECIAL)[0] for n in counts]
        out.append({"images": torch.randn(4, 3, 288, 288, generator=g), "ids": torch.tensor(rows)})
    return out


def step_and_grads(model, micro_batches, world_size: int) -> tuple[dict, dict]:
    """One TrainStep; (its metrics, each parameter's whole gradient when the optimizer steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = {}
    real_step = optimizer.step

    def recording_step(*args, **kwargs):
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("module.", "", 1)] = g.detach().clone()
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    step = TrainStep(model, optimizer, SPECIAL, StepSettings(**SETTINGS, world_size=world_size), torch.device("cpu"))
    return step(micro_batches), grads


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        mine = [{k: v[2 * rank : 2 * rank + 2] for k, v in b.items()} for b in global_micro_batches()]
        results = {}
        for parallelism in ("ddp", "fsdp"):
            model = parallelize(tiny_model(), info, parallelism=parallelism)
            results[parallelism] = step_and_grads(model, mine, world_size=2)

        # FSDP2's mixed precision as the trainer sets it (param_dtype = the autocast dtype): the
        # weights a block computes with are bf16, the sharded weights and their gradients fp32.
        model = parallelize(tiny_model(), info, parallelism="fsdp", param_dtype=torch.bfloat16)
        seen = []
        linear = model.vit.blocks[0].attn.qkv
        linear.register_forward_pre_hook(lambda m, _inputs: seen.append(m.weight.dtype))
        with autocast_context(torch.bfloat16, "cpu"):
            output = model(mine[0]["images"], mine[0]["ids"])
            (output.logits.float().mean() + output.image_embed.float().sum()).backward()
        results["precision"] = {"compute": [str(d) for d in seen],
                                "sharded": sorted({str(p.dtype) for p in model.parameters()}),
                                "grads": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(root / "init"), str(root / "result")), nprocs=2, join=True)
    return [torch.load(root / f"result.{r}", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return step_and_grads(tiny_model(), global_micro_batches(), world_size=1)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_compute_the_step_of_one(two_ranks, one_process, parallelism):
    metrics, grads = one_process
    for rank in range(2):
        theirs, their_grads = two_ranks[rank][parallelism]
        assert theirs["num_tokens"] == metrics["num_tokens"]
        for key in ("loss", "contrastive", "caption", "grad_norm"):
            assert theirs[key] == pytest.approx(metrics[key], rel=1e-5), (rank, key)
        assert their_grads.keys() == grads.keys()
        for name, g in grads.items():
            error = float((their_grads[name] - g).abs().max() / g.abs().max())
            assert error <= 1e-4, (rank, name, error)


def test_fsdp_mixed_precision_gathers_bf16_and_keeps_fp32_master_weights_and_gradients(two_ranks):
    for rank in range(2):
        precision = two_ranks[rank]["precision"]
        assert precision["compute"] == ["torch.bfloat16"], precision
        assert precision["sharded"] == ["torch.float32"] and precision["grads"] == ["torch.float32"], precision


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_the_trainer_gives_fsdp_its_autocast_dtype(monkeypatch, tmp_path, precision, dtype):
    from test_train import make_data, tiny

    import grr_train.train.trainer as trainer

    seen = []
    real = trainer.parallelize
    monkeypatch.setattr(trainer, "parallelize", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    data = make_data(tmp_path / "data", (4,))
    cfg = tiny(data, per_device_batch_size=4, val_split="none", precision=precision, parallelism="fsdp")
    (tmp_path / "run").mkdir()  # run_training makes it when it takes the lock
    trainer.Trainer(cfg, tmp_path / "run", DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert len(seen) == 1 and seen[0]["param_dtype"] is dtype and seen[0]["parallelism"] == "fsdp"


def test_one_process_reference_is_not_the_two_rank_split():
    """Guards the equivalence above against a comparison that cannot fail: the step's contrastive
    loss over 4 pairs differs from the mean of two 2-pair losses (what ranks that did not gather
    would compute), by far more than its 1e-5 tolerance."""
    from reference_losses import contrastive

    model = tiny_model().eval()
    with torch.no_grad():
        b = global_micro_batches()[0]
        out = model(b["images"], b["ids"])
        whole = float(contrastive(out.image_embed, out.text_embed, 0.07))
        halves = [float(contrastive(out.image_embed[s : s + 2], out.text_embed[s : s + 2], 0.07)) for s in (0, 2)]
    assert abs(whole - sum(halves) / 2) > 1e-3 * whole

