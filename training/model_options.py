"""Memory and speed options of a run that leave the results unchanged: --grad_checkpointing, --compile,
and the log line of --contrastive_chunk_size (gradient caching runs in the train step)."""
from __future__ import annotations

import logging
import time

import torch

from runtime.logs import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

ENCODERS = ("encode_text", "encode_video")


class _CompiledEncoder:
    """A torch.compile'd encoder that logs how long each first call took (compilation included).

    A first call is one with a new combination of grad mode and input shapes: those are what make
    torch.compile (re)compile.
    """

    def __init__(self, name: str, fn, **compile_kwargs):
        self.name = name
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.seen: set = set()
        self.compile_seconds = 0.0  # the first calls' time, compilation included

    def __call__(self, *args, **kwargs):
        key = (torch.is_grad_enabled(),
               tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        if key in self.seen:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.seen.add(key)
        self.compile_seconds += seconds
        log.info("torch.compile: %s %s %s: first call %.1fs (compilation included)", self.name,
                 "with grad" if key[0] else "no grad", "x".join(map(str, key[1][0])) if key[1] else "", seconds)
        return out


def compile_encoders(model, **compile_kwargs):
    """torch.compile the text and video encoders of a DGL in place (``model.forward``, the evaluation
    and gradient caching call them). Parameters, state dict and checkpoints are unchanged."""
    for name in ENCODERS:
        fn = getattr(model, name)
        if isinstance(fn, _CompiledEncoder):
            continue
        setattr(model, name, _CompiledEncoder(name, fn, **compile_kwargs))
    return model


def compile_seconds(model) -> float:
    """Time spent in the compiled encoders' first calls so far (compilation included)."""
    return sum(getattr(model, name).compile_seconds for name in ENCODERS
               if isinstance(getattr(model, name), _CompiledEncoder))


def apply_model_options(model, args, world_size: int = 1) -> None:
    """--grad_checkpointing and --compile on the (unwrapped) model; log the gradient caching setting."""
    if getattr(args, "grad_checkpointing", 0):
        model.set_grad_checkpointing(True)
        log.info("gradient checkpointing of the vision blocks: activations are recomputed in the backward pass")
    chunk = getattr(args, "contrastive_chunk_size", 0)
    if chunk and getattr(args, "do_train", 0):
        micro = args.batch_size // args.gradient_accumulation_steps
        if chunk < micro:
            log.info("gradient caching: the contrastive loss sees %d samples (%d processes x %d), the encoders "
                     "run %d at a time", world_size * micro, world_size, micro, chunk)
        else:
            log.info("--contrastive_chunk_size %d >= the micro-batch (%d): no gradient caching needed", chunk, micro)
    if getattr(args, "compile", 0) == 1:
        compile_with_cache(model)


def compile_with_cache(model) -> None:
    """compile_encoders with PyTorch's compilation caches kept under the user's cache folder
    (runtime.compilation), logged."""
    from runtime.compilation import use_compile_cache

    folder = use_compile_cache()
    compile_encoders(model)
    log.info("torch.compile of the text and video encoders: compiled at their first calls (cache: %s)", folder)


def apply_auto_compile(model, args, training_steps: int) -> bool:
    """--compile auto: compile for long training runs (runtime.compilation.auto_compile); one log line."""
    if getattr(args, "compile", 0) != "auto":
        return False
    from runtime.compilation import auto_compile

    wanted, why = auto_compile(training_steps)
    log.info("%s", why)
    if wanted:
        compile_with_cache(model)
    return wanted
