"""Run under torchrun by tests/test_fsdp.py: shard grr-tiny with FSDP2 over the processes, take one
AdamW step, and print (rank 0) each rank's local numbers of parameter and optimizer-state
elements against the whole model's, as JSON."""

import json

import torch
from torch.distributed.tensor import DTensor

from grr_train.model import build_model, get_config
from grr_train.runtime.distributed import all_gather_objects, destroy_distributed, init_distributed
from grr_train.runtime.parallel import parallelize


def local_numel(tensor: torch.Tensor) -> int:
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def main() -> None:
    info = init_distributed()
    torch.manual_seed(info.rank)
    model = build_model(get_config("grr-tiny", dropout=0.0))
    whole = sum(p.numel() for p in model.parameters())
    model = parallelize(model, info, parallelism="fsdp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    out = model(torch.randn(2, 3, 288, 288), torch.randint(2, 100, (2, 64)))
    (out.logits.float().mean() + out.image_embed.sum() + out.text_embed.sum()).backward()
    optimizer.step()
    record = {
        "rank": info.rank,
        "whole": whole,
        "parameters": sum(local_numel(p) for p in model.parameters()),
        "gradients": sum(local_numel(p.grad) for p in model.parameters()),
        "exp_avg": sum(local_numel(s["exp_avg"]) for s in optimizer.state.values()),
    }
    records = all_gather_objects(record)
    if info.is_main:
        print(json.dumps(records))
    destroy_distributed()


if __name__ == "__main__":
    main()
