"""Training one generation on several processes (data-parallel), launched by torchrun.

    torchrun --nproc_per_node=2 -m zoolib.train --workspace WS params.yaml

The command line is `zoolib.train`'s (the module that launches, as in nanoGPT);
this module is the machinery below it: the process group, sharding, the DDP
wrapper and rank 0's say over what is written.

Every process runs `train.train` with the same settings. The model is wrapped in
torch's `DistributedDataParallel` (gradients are averaged across processes after
each backward) and each process reads its own 1/N of every epoch's images, so
an epoch takes 1/N of the steps and **the effective batch is N x BATCH_SIZE**
(raise LR with it, or lower BATCH_SIZE, to keep a single-process run's
schedule). Validation is split the same way and its loss and accuracy are
averaged across processes (fastai's `to_detach` gathers them), so every process
judges the plateau on the same numbers and they stop together. A shard is the
epoch's order rounded up to a multiple of N, so a few images may count twice.

Rank 0 is the only process that writes: the library scan, the frozen benchmark
and the splits (`on_main`, which sends the result to the others), the run's
lock, checkpoints and kept weights, and the generation (weights, model.json,
history). The others read what rank 0 wrote: the pixel cache is filled by rank
0 first (`rank0_first`), then read by all.

Why not `fastai.distributed` (`learn.distrib_ctx()`, `rank0_first`): in fastai
2.8 it is built on `accelerate`, which zoolib does not install, and the module
does not even import without it; its `DistributedDL` broadcasts the epoch's
order as a CUDA tensor, so it cannot run on CPUs (gloo); and it wraps the model
once before the fit, while a warm start freezes the body for its first epochs
(DDP must be built on the parameters that train). `DataParallelTrainer` is the
same shape as its `DistributedTrainer`: a callback on the one fastai Learner
`train` builds, so there is no second training loop.

Backend: nccl with CUDA (one GPU per process, `LOCAL_RANK`), gloo on CPUs.
Batch norm statistics are each process's own batch (rank 0's running averages
are broadcast every step by DDP); SyncBatchNorm is CUDA-only and not used.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.data.core import TfmdDL
from torch.nn.parallel import DistributedDataParallel

from .schedule import PlateauSchedule
from .workspace import ZoolibError

T = TypeVar("T")

# The other processes wait at a collective while rank 0 scans the library and fills the
# pixel cache: the first run on a large library hashes and decodes every image (torch's
# default of 30 minutes can be too short for that).
WAIT = timedelta(hours=2)


def world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is the one that writes (rank 0, or the only one)."""
    return rank() == 0


def init() -> bool:
    """Join the process group torchrun describes in the environment (env://).

    Returns:
        Whether this process trains with others (False when not started by torchrun).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per process; nccl and fastai both use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    return True


def _device() -> torch.device:
    """Where collective tensors live: nccl only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def on_main(func: Callable[..., T], *args, **kwargs) -> T:
    """`func(*args, **kwargs)` run on rank 0 only, its result sent to every process.

    A ZoolibError raised on rank 0 is raised on every process (any other error
    becomes a RuntimeError there), so all of them stop instead of waiting.
    """
    if world_size() == 1:
        return func(*args, **kwargs)
    box: list = [None]
    error = None
    if is_main():
        try:
            box = [(True, func(*args, **kwargs))]
        except Exception as exc:  # noqa: BLE001 - every process must hear of it
            error = exc
            sent = exc if isinstance(exc, ZoolibError) else RuntimeError(
                f"rank 0 failed: {type(exc).__name__}: {exc}")
            box = [(False, sent)]
    dist.broadcast_object_list(box, src=0, device=_device())
    if error is not None:
        raise error  # rank 0 keeps its own traceback
    ok, value = box[0]
    if not ok:
        raise value
    return value


@contextmanager
def rank0_first():
    """Run the block on rank 0 first, then on the others (which may read what it wrote)."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


def _broadcast_order(idxs: list[int]) -> list[int]:
    """Rank 0's order of an epoch: every process must shard the same permutation."""
    t = torch.tensor(idxs, dtype=torch.long, device=_device())
    dist.broadcast(t, src=0)
    return t.cpu().tolist()


def shard(dl: TfmdDL, rank: int, world: int) -> TfmdDL:
    """Process `rank`'s part of `dl`: every `world`-th item of each epoch's order.

    The order still comes from `dl` (its random generator draws the shuffle, as
    in a single process), so a checkpoint of `dl`'s state resumes the same epochs.
    """
    n = dl.n
    per_rank = -(-n // world)  # the order is padded with its start to world x per_rank

    def get_idxs() -> list[int]:
        dl.randomize()  # what iterating `dl` itself would do before drawing the order
        order = _broadcast_order(list(dl.get_idxs()))
        padded = [order[i % n] for i in range(per_rank * world)]
        return padded[rank::world]

    return dl.new(n=per_rank, get_idxs=get_idxs)


def _trainable(model: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


class DataParallelTrainer(Callback):
    """Train the Learner's model with DistributedDataParallel on sharded batches.

    The model is wrapped at the start of an epoch, after the schedule has set
    which parameters train, and wrapped again whenever that set changes (DDP
    reduces the gradients of the parameters that required them when it was
    built: the first, frozen epochs of a warm start train the head alone).
    """

    order = PlateauSchedule.order + 1  # after the schedule's freeze or unfreeze

    def before_fit(self):
        self.plain, self.wrapped_for, self.shards = self.learn.model, None, {}
        if rank():  # dropout and augmentation draw differently on each process
            torch.manual_seed(torch.initial_seed() + rank())

    def before_epoch(self):
        trainable = _trainable(self.plain)
        if trainable != self.wrapped_for:
            ids = [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
            self.learn.model = DistributedDataParallel(self.plain, device_ids=ids)
            self.wrapped_for = trainable

    def _shard(self):
        dl = self.learn.dl
        if id(dl) not in self.shards:
            self.shards[id(dl)] = shard(dl, rank(), world_size())
        self.learn.dl = self.shards[id(dl)]

    def before_train(self):
        self._shard()

    def before_validate(self):
        self._shard()

    def after_fit(self):
        self.learn.model = self.plain


def parallel_callbacks() -> list[Callback]:
    """The callbacks a run needs on this process: none unless it trains with others."""
    return [DataParallelTrainer()] if world_size() > 1 else []
