"""Data parallel under torchrun: each rank samples its share of the step's groups, and these
helpers sum across ranks (each is the identity in a single process). gloo on CPU, nccl on GPUs.
With --fsdp, `shard` splits the training state over the ranks (PyTorch's FSDP2) and `gathered`
holds the full weights for a rollout."""

import atexit
import contextlib
import gc
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
        atexit.register(shut_down)
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's
    return dist.get_rank(), world, _DEVICE


def shut_down():
    """Before the interpreter exits: free what is unreachable, then leave the process group.
    After FSDP's collectives, a process that left this to the interpreter's teardown aborted
    at exit in 1 run of 3 on the CPU (gloo); collected first, none did in 6."""
    gc.collect()
    dist.destroy_process_group()


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
    token-mean gradient of the whole minibatch. A sharded model's backward already summed them."""
    if not dist.is_initialized() or is_sharded(model):
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


# Fully sharded data parallel (--fsdp) -----------------------------------------------------------
def shard(model):
    """FSDP2: each decoder layer, then the rest of the model, keeps 1/N of its parameters on each
    of the N ranks, and so of its gradients and AdamW moments. A layer's full weights are
    gathered for its forward (and again for its backward) and freed after. Gradients are summed
    over ranks, not averaged: as in sum_gradients, each rank weighted its tokens by the global
    count. Returns the model, changed in place (its parameters become DTensors)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)  # the embedding, final norm and head: gathered at the model's forward
    for unit in fsdp_units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-scaled one
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """The full weights on every rank for the duration of the block, gathered once: `generate`
    would otherwise gather every layer at every decoding step. Costs one unsharded copy of the
    weights per rank while it lasts. The identity for a model that is not sharded."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:  # layers free their weights after a forward again; the root keeps
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # them for the head
            unit.reshard()


def reshard(model):
    """Free what a sharded model holds gathered: its root keeps the embedding and head after a
    forward (for the head's pass), which a model that never runs a backward would keep for good.
    Nothing for None or a model that is not sharded."""
    for unit in fsdp_units(model) if model is not None else []:
        unit.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a plain one: a DTensor (sharded, or a sum over ranks pending) made whole."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model, optimizer) -> tuple:
    """(weights, optimizer state) of a sharded model, whole, on the CPU of rank 0 (empty on the
    others): a state dict save_pretrained writes, and one keyed by parameter name that
    `load_full_optimizer_state` gives back to any number of ranks. Every rank must call it.
    Before any update the optimizer's own (empty) state: reading a sharded one would initialise
    AdamW's moments and step count with a step of lr 0, changing the next update's bias
    correction."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if not optimizer.state:  # the same on every rank: the same updates were taken
        return weights, optimizer.state_dict()
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model, optimizer, path: str):
    """Give a sharded model's optimizer the whole state `full_state` saved to `path`, whatever
    the number of ranks it was saved with: rank 0 reads it and sends each rank its shard (on 8
    GPUs each rank reading all 61 GB of a 7B model's AdamW state would need 490 GB of memory)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = torch.load(path, "cpu", weights_only=True, mmap=True) if dist.get_rank() == 0 else {}
    if all_sum(len(saved.get("state", {}))) == 0:  # saved before any update: a plain empty one
        return optimizer.load_state_dict(torch.load(path, "cpu", weights_only=True))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, saved, options=options)
