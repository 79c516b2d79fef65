"""CPU settings of a program run, chosen when it starts and logged: how its cores are split between
compute threads and data-loader workers, and which kernels compute the model (``modules.backends``
measures and applies them: exact oneDNN fp32 products, the attention backend, bf16 storage of the frozen
backbone).

* Cores: compute threads plus data-loader workers fit the cores given to this process (the cores
  this process may run on, shared among the processes torchrun starts on the machine).

Every setting is process-global; ``restore()`` undoes them (``training.runner`` calls it when a run ends).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from modules.backends import (EMULATED_BF16, MODEL_TIMING_BATCH, USES, backends_from_name, bf16_speedup, restore,
                              set_threads, tune_dtypes)
from runtime.logs import LOGGER_NAME
from runtime.precision import Precision

log = logging.getLogger(LOGGER_NAME)

__all__ = ["available_cores", "processes_on_this_machine", "CoreSplit", "split_cores", "resolve_core_split",
           "apply_cpu_settings", "inference_settings", "restore"]


# ------------------------------------------------------------------------------------------ cores
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; all of them where that cannot be read)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def processes_on_this_machine() -> int:
    """Processes started on this machine: torchrun's LOCAL_WORLD_SIZE; without it (other launchers) all
    WORLD_SIZE processes are assumed to share this machine; 1 outside a distributed run."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


@dataclass
class CoreSplit:
    threads: int  # torch compute threads of this process
    workers: int  # DataLoader workers of this process
    cores: int  # cores of this process (machine cores / processes on the machine)
    note: str

    @property
    def oversubscribed(self) -> bool:
        return self.threads + self.workers > self.cores


def split_cores(cores: int, threads: int | None = None, workers: int | None = None,
                cuda: bool = False) -> CoreSplit:
    """Compute threads and loader workers for ``cores`` cores; None means choose.

    On CPU the model needs the cores more than the loader does: one worker from 4 cores on, one more
    per 4 cores (at most 8). With CUDA the loader is what keeps the GPU fed: every core but one goes
    to workers (at most 8). Given values are kept; only the other one is fitted around them.
    """
    cores = max(1, cores)
    auto_workers = min(8, cores - 1) if cuda else min(8, cores // 4)
    if workers is None:
        workers = auto_workers if threads is None else min(auto_workers, max(0, cores - threads))
    if threads is None:
        threads = max(1, cores - workers)
    split = CoreSplit(threads=threads, workers=workers, cores=cores, note="")
    split.note = (f"{threads} compute thread(s) + {workers} data-loader worker(s) on {cores} core(s)"
                  + (" - more than the cores: compute and loading slow each other down "
                     "(lower --threads or --num_thread_reader)" if split.oversubscribed else ""))
    return split


def resolve_core_split(args) -> CoreSplit:
    """Fill in --threads and --num_thread_reader (None = choose) for this process; returns the split."""
    cuda = args.device == "cuda" or args.gpu is not None or (args.device == "auto" and torch.cuda.is_available())
    cores = max(1, available_cores() // processes_on_this_machine())
    split = split_cores(cores, args.threads, args.num_thread_reader, cuda=cuda)
    args.threads, args.num_thread_reader = split.threads, split.workers
    return split


# ------------------------------------------------------------------------------------------ a run
def apply_cpu_settings(args, device: torch.device, model, precision, recorded: dict | None = None,
                       uses: tuple | None = None) -> None:
    """Threads, then on CPU ``modules.backends.tune_dtypes`` (fp32 product path and attention backend per use,
    each timed on the run's own training step and evaluation forward; bf16 storage) for the dtypes of
    ``precision``, for a run of main.py; logs each.

    ``precision`` (runtime.precision.Precision) gets the kernels to use. ``recorded``: {use: choice record}
    of an earlier run (a --resume checkpoint, an index), taken without timing. ``uses``: what the run
    computes (default: training and evaluation, evaluation alone with ``args.do_train`` 0).
    """
    split = resolve_core_split(args)
    set_threads(split.threads)
    (log.warning if split.oversubscribed else log.info)("cores: %s", split.note)
    forced = getattr(args, "attention_backend", "auto") or "auto"
    if forced != "auto":  # the same kernels on every run, whatever a timing would say
        precision.eval_attention = precision.train_attention = backends_from_name(forced)
        log.info("attention backend: %s for training and evaluation (--attention_backend)", forced)
    if device.type != "cpu":
        return
    if not getattr(args, "cpu_tuning", 1):
        log.info("CPU tuning off (--cpu_tuning 0): MKL fp32 products, %s, bf16 by autocast alone",
                 "PyTorch's attention choice" if forced == "auto" else f"{forced} attention")
        return
    if uses is None:
        uses = USES if getattr(args, "do_train", 1) else ("eval",)
    micro = (getattr(args, "batch_size", 0) or 0) // max(1, getattr(args, "gradient_accumulation_steps", 1) or 1)
    batch = min(MODEL_TIMING_BATCH, micro) if micro > 0 else MODEL_TIMING_BATCH
    bf16 = torch.bfloat16
    tuning = tune_dtypes(model, device, bf16 if precision.dtype == bf16 else None, precision.eval_video_dtype,
                         precision.eval_text_dtype, until_restore=True, pick_attention=forced == "auto",
                         fp32_path=getattr(args, "fp32_path", None), uses=uses, recorded=recorded,
                         attention=precision.eval_attention if forced != "auto" else None, batch=batch)
    for line in tuning.describe():
        log.info("%s", line)
    if forced == "auto" and tuning.choices:
        precision.eval_attention, precision.train_attention = tuning.eval_attention, tuning.train_attention
    if tuning.choices:
        precision.fp32_path = tuning.choices[uses[0]].fp32
        precision.train_fp32_path, precision.eval_fp32_path = tuning.train_fp32, tuning.eval_fp32
        precision.kernels = tuning.record()
    _warn_if_bf16_is_slow(precision)


def _warn_if_bf16_is_slow(precision) -> None:
    if torch.bfloat16 in (precision.dtype, precision.eval_video_dtype):
        speedup = bf16_speedup()
        if speedup < EMULATED_BF16:
            log.warning("bf16 matrix products run at %.2fx the fp32 rate on this CPU (no native bf16): "
                        "bf16 is slower than fp32 here", speedup)
        else:
            log.info("bf16 matrix products run at %.2fx the fp32 rate on this CPU", speedup)


def inference_settings(model, device: torch.device | str = "cpu", threads: int | None = None,
                       eval_precision: str | None = None, attention_backend: str = "auto",
                       fp32_path: str | None = None, recorded: dict | None = None, batch: int | None = None):
    """The same start-up choices for a tool that only encodes (e.g. indexing a folder of videos):
    threads (all cores by default), fp32 product path, attention backend. Returns the
    runtime.precision.Precision whose ``eval_autocast()`` / ``eval_video_autocast()`` to encode under.
    ``restore()`` undoes the settings. ``attention_backend`` ("math", "flash", PyTorch's choice) and
    ``fp32_path`` ("onednn", "mkl") repeat an earlier run's choices instead of timing them, as does
    ``recorded`` ({"eval": choice record}). The evaluation forward is timed on ``batch`` videos."""
    import argparse

    device = torch.device(device)
    precision = Precision("fp32", device, eval_precision)
    args = argparse.Namespace(threads=threads, num_thread_reader=0, device=device.type, gpu=None, cpu_tuning=1,
                              attention_backend=attention_backend, fp32_path=fp32_path, batch_size=batch or 0)
    apply_cpu_settings(args, device, model, precision, recorded=recorded, uses=("eval",))
    return precision


