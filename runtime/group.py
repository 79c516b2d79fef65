"""The processes of one program run: a single process, or the processes torchrun starts (one or many
machines), joined in a gloo group.

A program that splits work between processes asks its :class:`Group` for its ``rank`` and ``world_size``
and exchanges small Python objects with ``gather`` (every process gets every process's object) and
``broadcast``. The single-process group does the same without torch.distributed, so one code path
serves both.
"""
from __future__ import annotations

import datetime
import os
import sys


class GroupMember:
    """A process among the processes of its run: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank, world_size, local_rank = 0, 1, 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Group(GroupMember):
    """One process alone: rank 0 of 1."""

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process (a barrier too)."""
        return [obj]

    def broadcast(self, obj, src: int = 0):
        """``src``'s ``obj`` on every process."""
        return obj

    def close(self) -> None:
        pass


class TorchGroup(Group):
    """The torch.distributed group of a torchrun launch."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    def gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launched_processes() -> int:
    """WORLD_SIZE of a torchrun launch; 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def join(cuda: bool, timeout_hours: float = 48.0) -> Group:
    """This process's group: a :class:`TorchGroup` under torchrun, else the single-process :class:`Group`.
    With ``cuda`` the process's device is cuda:LOCAL_RANK.

    The group only carries small Python objects, so it is a gloo group on GPUs too (no NCCL communicator,
    no GPU memory). Its ``timeout_hours`` is long: a process that finishes its share waits in the last
    exchange for the slowest one, and process 0 may wait for another run's writer lock; a process that
    dies is noticed by torchrun, which stops the others."""
    world = launched_processes()
    if world == 1:
        return Group()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(torch.device("cuda", local_rank))
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=timeout_hours))
    return TorchGroup(rank, world, local_rank)


def exit_now(status: int) -> None:
    """End a member of a group that stops on an error, with ``status``, at once: destroying the group can
    wait forever on a member still inside a collective, and leaving gloo's threads alive into interpreter
    shutdown can abort the process (SIGABRT), replacing the status. Output is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
