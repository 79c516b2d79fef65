"""The kernels a run computes with (fp32 product path and attention backend, per use), as checkpoints
record them, and read back from a --resume checkpoint or from rank 0 so that a resumed run or every
process of a distributed one computes as the first did. The choice itself is ``runtime.cpu``'s."""
from __future__ import annotations

import logging

from modules.backends import USES, backend_name, backends_from_name, recorded_choice
from training import distributed as D

log = logging.getLogger("dgl")


def attention_record(precision, device_type: str) -> dict:
    """The attention backends a run computes with, as checkpoints record them."""
    return {"train": backend_name(precision.train_attention), "eval": backend_name(precision.eval_attention),
            "device": device_type}


def kernel_record(precision, device_type: str) -> dict:
    """The kernels of each use a run computes with (and the timings that chose them), as checkpoints record
    them for --resume."""
    timed = precision.kernels or {}
    record = {"device": device_type}
    for use, attention, fp32 in (("train", precision.train_attention, precision.train_fp32_path),
                                 ("eval", precision.eval_attention, precision.eval_fp32_path)):
        record[use] = {**timed.get(use, {}), "attention": backend_name(attention),
                       "fp32_products": fp32 or precision.fp32_path or "mkl"}
    return record


def recorded_kernels(ckpt: dict, device_type: str, fp32_flag: str | None, attention_flag: str) -> dict | None:
    """{use: choice record} a --resume checkpoint recorded on this device type (older checkpoints: their
    fp32 product path and attention backends), with --fp32_path / --attention_backend given on the command
    line in their place; None when it recorded nothing for this device type."""
    kernels = ckpt.get("kernels")
    if isinstance(kernels, dict) and kernels.get("device") == device_type \
            and all(isinstance(kernels.get(use), dict) for use in USES):
        recorded = {use: dict(kernels[use]) for use in USES}
    else:
        fp32, attention = ckpt.get("fp32_products"), ckpt.get("attention_backends")
        if not (isinstance(fp32, dict) and fp32.get("device") == device_type and fp32.get("path") in ("onednn", "mkl")
                and isinstance(attention, dict) and attention.get("device") == device_type):
            return None
        recorded = {use: {"fp32_products": fp32["path"], "attention": attention.get(use)} for use in USES}
    for record in recorded.values():
        if fp32_flag is not None:
            record["fp32_products"] = fp32_flag
        if attention_flag != "auto":
            record["attention"] = attention_flag
        try:
            recorded_choice(record)
        except ValueError as e:
            log.warning("[resume] kernels recorded in the checkpoint not used: %s", e)
            return None
    return recorded


def use_attention_backends(precision, names: dict, source: str) -> None:
    """Train and evaluate under the attention backends ``names`` ({"train": .., "eval": ..}) instead of
    this process's own choice, so that a rerun or a resumed run computes as the first one did."""
    train, evaluation = backends_from_name(names["train"]), backends_from_name(names["eval"])
    precision.train_attention, precision.eval_attention = train, evaluation
    precision.attention_source = source
    log.info("attention backend (%s): evaluation %s, training %s", source, names["eval"], names["train"])


def rank0_attention_backends(precision) -> dict:
    """Rank 0's attention backends, as names, on every process."""
    return D.broadcast_object({"train": backend_name(precision.train_attention),
                               "eval": backend_name(precision.eval_attention)})
