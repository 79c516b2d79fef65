"""Checkpoint files in the official DGL layout, written atomically.

``ckpt.pth.tar`` / ``ckpt.best.pth.tar`` are ``torch.save`` dicts with the published keys
    epoch (epochs completed), global_step, arch, best_acc1 (best text-to-video R@1), optimizer,
    scaler (only with AMP), state_dict ("module." + the model's official names, like a DDP run of
    the published code)
plus extra keys the published code ignores and ``--resume`` uses to continue exactly:
    rng (python / numpy / torch / cuda generator states), schedule, config, results, format.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "dgl-reimpl-1"


def _atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_np_save(path: str, array) -> None:
    _atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict | None) -> None:
    if not state:
        return
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # noqa: BLE001 - different GPU count: not fatal
            pass


def with_module_prefix(sd: dict) -> dict:
    return {(k if k.startswith("module.") else "module." + k): v for k, v in sd.items()}


def strip_module_prefix(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


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


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except TypeError:  # very old torch
        ckpt = torch.load(path, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dict")
    if "state_dict" not in ckpt:
        # a bare state dict
        ckpt = {"state_dict": ckpt}
    return ckpt


def is_own_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT
