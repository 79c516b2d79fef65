"""Checkpoint files in the official DGL layout, written atomically.

``ckpt.pth.tar`` / ``ckpt.best.pth.tar`` are ``torch.save`` dicts with the published keys
    epoch (epochs completed), global_step, arch, best_acc1 (best text-to-video R@1), optimizer,
    scaler (only with AMP), state_dict ("module." + the model's official names, like a DDP run of
    the published code)
plus extra keys the published code ignores and ``--resume`` uses to continue exactly:
    rng (python / numpy / torch / cuda generator states), schedule, config, results, format.
Reading them is ``modules.checkpoints``; the atomic writing is ``runtime.files``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from modules.checkpoints import FORMAT, with_module_prefix


def rng_state() -> dict:
    """Generator states as plain types / tensors, so that checkpoints load with weights_only=True."""
    py = random.getstate()
    npst = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]),
                       float(npst[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    if "python" in state:
        v, s, g = state["python"]
        random.setstate((v, tuple(s), g))
    if "numpy" in state:
        n, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((n, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # noqa: BLE001 - another GPU count
            pass


def make_checkpoint(model, optimizer, scaler, epoch: int, global_step: int, best_acc1: float,
                    extra: dict | None = None) -> dict:
    state = model.state_dict()
    ckpt = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "arch": "DGL",
        "state_dict": with_module_prefix({k: v.detach().cpu() for k, v in state.items()}),
        "best_acc1": float(best_acc1),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "format": FORMAT,
    }
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt.update(extra)
    return ckpt


