"""Data parallel under torchrun: each rank samples its share of the step's groups, and these
helpers sum across ranks (each is the identity in a single process). gloo on CPU, nccl on GPUs."""

import atexit
import os
import sys

import torch
import torch.distributed as dist

_DEVICE = None  # where this rank's collectives run


def init_distributed():
    """(rank, world size, device). Under torchrun, joins the process group; ranks other than 0
    print nothing (rank 0 logs and saves for all)."""
    global _DEVICE
    world = world_size()
    cuda = torch.cuda.is_available()
    if world == 1:
        _DEVICE = torch.device("cuda" if cuda else "cpu")
        return 0, 1, _DEVICE
    _DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(_DEVICE)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)  # before exit: no abort in gloo's threads
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's
    return dist.get_rank(), world, _DEVICE


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun for every process


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_sum(x) -> torch.Tensor:
    """x (a number or a 0-d tensor) summed over ranks, as a float64 tensor."""
    t = torch.as_tensor(x, dtype=torch.float64, device=_DEVICE or "cpu").detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t ([n, ...], the same n on each), concatenated in rank order."""
    if not dist.is_initialized():
        return t
    t = t.to(_DEVICE).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def sum_gradients(model):
    """Sum each gradient over ranks (what DistributedDataParallel does, bucketed and overlapped
    with the backward): each rank weighted its tokens by the global count, so the sum is the
    token-mean gradient of the whole minibatch."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a rank whose micro-batches were all empty
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def barrier(value=None):
    """Wait for every rank; returns value."""
    if dist.is_initialized():
        dist.barrier()
    return value
