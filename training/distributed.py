"""Process-group helpers.  A plain ``python main.py`` is a single process without any process
group; ``torchrun --nproc_per_node N main.py ...`` (one or many nodes) sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR and we join with NCCL on GPUs, gloo on CPU."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.group import GroupMember, exit_now as exit_member  # noqa: F401 - exit_member: main.py's name for it


@dataclass
class DistInfo(GroupMember):
    """This process of a main.py run (``distributed``, ``is_main``), its device and its group's backend."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def setup(device: str = "auto", backend: str = "auto", gpu: int | None = None,
          timeout_minutes: int = 120) -> DistInfo:
    """Join the process group when launched by torchrun; choose the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        idx = gpu if (gpu is not None and world == 1) else local_rank
        dev = torch.device("cuda", idx)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not is_initialized():
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = dict(backend=be, timeout=datetime.timedelta(minutes=timeout_minutes))
        if be == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        info.backend = be
    elif is_initialized():
        info.backend = dist.get_backend()
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all processes (their row counts may differ).  No gradient."""
    if not is_initialized() or get_world_size() == 1:
        return t
    ws = get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    pad = t.new_zeros((m - t.shape[0],) + tuple(t.shape[1:]))
    buf = torch.cat([t, pad], 0).contiguous()
    out = [torch.empty_like(buf) for _ in range(ws)]
    dist.all_gather(out, buf)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], 0)


def broadcast_object(obj, src: int = 0):
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_list(items: list) -> list:
    """The concatenation of every process's list (picklable items)."""
    if not is_initialized() or get_world_size() == 1:
        return list(items)
    out = [None] * get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def all_reduce_sum(value: float, device) -> float:
    if not is_initialized() or get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
