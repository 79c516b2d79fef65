"""Checkpoint files in the official DGL layout, written atomically.

``ckpt.pth.tar`` / ``ckpt.best.pth.tar`` are ``torch.save`` dicts with the published keys
    epoch (epochs completed), global_step, arch, best_acc1 (best text-to-video R@1), optimizer,
    scaler (only with AMP), state_dict ("module." + the model's official names, like a DDP run of
    the published code)
plus extra keys the published code ignores and ``--resume`` uses to continue exactly:
    rng (python / numpy / torch / cuda generator states), schedule, config, results, format.
Reading them is ``modules.checkpoints`` (``read_checkpoint`` below says what is wrong in one line); the
atomic writing is ``runtime.files``.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from modules.checkpoints import (FORMAT, CheckpointError, checkpoint_latent_space, load_checkpoint_file,
                                 with_module_prefix)
from modules.dgl import DGLConfig
from runtime.errors import fail, first_line

log = logging.getLogger("dgl")


def seed_all(seed: int) -> None:
    """Python's, numpy's and torch's generators (``rng_state`` below saves them all)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


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




def plain_config(args) -> dict:
    """The flags as plain values, as the checkpoint's ``config`` records them."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()}


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str, flag: str) -> dict:
    """The checkpoint at ``path`` (given as ``flag``), or a one-line error."""
    try:
        return load_checkpoint_file(path)
    except CheckpointError as e:
        fail(f"{flag} {e}")
    except OSError as e:
        fail(f"cannot read {flag} {path}: {os.strerror(e.errno).lower() if e.errno else e}")


def load_weights(core, ckpt: dict, path: str, flag: str) -> None:
    """The checkpoint's weights into ``core`` (a DGL), or a one-line error naming what does not fit."""
    space, wanted = checkpoint_latent_space(ckpt), core.config.shared_latent_space
    if space is not None and space != wanted:
        fail(f"{flag} {path}: this checkpoint is a {space}-latent-space DGL; pass --shared_latent_space "
             f"{space} (the model was built with --shared_latent_space {wanted})")
    try:
        core.load_checkpoint(ckpt)
    except (ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot load {flag} {path}: {first_line(e)[:400]}")


def checkpoint_flag_mismatch(ckpt: dict, args) -> tuple[str, object, object] | None:
    """``(--flag, checkpoint's value, this run's value)`` of the first model flag that our checkpoint's
    recorded configuration (``ckpt["config"]``) gives differently from ``args``; None when all agree or
    nothing is recorded (official checkpoints: their latent space and shapes are checked on loading)."""
    for name, recorded in DGLConfig.recorded_in(ckpt).items():
        wanted = getattr(args, name, None)
        if wanted is None:
            continue
        if isinstance(recorded, bool):  # a 0/1 flag on the command line
            recorded, wanted = int(recorded), int(bool(wanted))
        if recorded != wanted:
            return f"--{name}", recorded, wanted
    return None


def check_resume_flags(ckpt: dict, args, path: str) -> None:
    """--resume with a model flag the checkpoint was not trained with: refused when training (the run
    would go on as another model; the weights load whenever the shapes agree), a warning when only
    evaluating (a deliberate test of the trained weights under other flags)."""
    mismatch = checkpoint_flag_mismatch(ckpt, args)
    if mismatch is None:
        return
    flag, trained, given = mismatch
    if args.do_train:
        fail(f"--resume {path} was trained with {flag} {trained}; this run has {flag} {given} (a resumed run "
             f"continues with the checkpoint's model flags: pass {flag} {trained})")
    log.warning("[resume] %s was trained with %s %s; this evaluation runs with %s %s", path, flag, trained,
                flag, given)
