"""torch.distributed helpers the trainer's parts share; each works unchanged in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device | None:
    """Where tensors of a collective must be: the GPU under NCCL, anywhere (None) under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_values(values: dict[str, float], op=dist.ReduceOp.SUM) -> dict[str, float]:
    """`values` reduced over the ranks."""
    if rank_and_world()[1] == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=op)
    return dict(zip(keys, tensor.tolist()))


def all_gather_padded(values: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D or 2-D `values`, whatever its length on each rank (no gradient)."""
    device = collective_device()
    local = values.to(device) if device is not None else values
    length = torch.tensor([values.shape[0]], device=local.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(lengths).item())
    padded = local.new_zeros((longest, *values.shape[1:]))
    padded[: values.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return [g[: int(n.item())].to(values.device) for g, n in zip(gathered, lengths)]


class _AllGatherWithGrad(torch.autograd.Function):
    """[n, ...] on each rank (n equal on all) -> [world, n, ...]; the gradient of each rank's slice is the sum
    of every rank's gradient for it, so it reaches the rank that computed the slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.float()  # (summed in fp32: a bf16 sum over ranks would round)
        dist.all_reduce(summed)
        return summed[dist.get_rank()].to(grad.dtype)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _AllGatherWithGrad.apply(tensor)
