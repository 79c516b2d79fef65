"""Checkpoint files in the official DGL layout, written atomically.

``ckpt.pth.tar`` / ``ckpt.best.pth.tar`` are ``torch.save`` dicts with the published keys
    epoch (epochs completed), global_step, arch, best_acc1 (best text-to-video R@1), optimizer,
    scaler (only with AMP), state_dict ("module." + the model's official names, like a DDP run of
    the published code)
plus extra keys the published code ignores and ``--resume`` uses to continue exactly:
    rng (python / numpy / torch / cuda generator states), schedule, config, results, format.
"""
from __future__ import annotations

import errno
import os
import random
import tempfile
import warnings

import numpy as np
import torch

FORMAT = "dgl-reimpl-1"


class OutputWriteError(OSError):
    """A result file could not be written; the message names the file and the reason, in one line."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model; the message is one line."""


TMP_SUFFIX = ".tmp"


def _write_failure_reason(exc: BaseException, directory: str) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    # torch's zip writer reports a failed write as "unexpected pos ..." / "file write failed"
    try:
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "no space left on device"
    except OSError:
        pass
    text = str(exc).strip().splitlines()
    return f"write failed ({type(exc).__name__}: {text[0] if text else ''})"


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Write to a temporary file next to ``path``, then rename it: ``path`` is the old file or the new one,
    never a part. A failure removes the temporary file and raises :class:`OutputWriteError`."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=d)
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(f"{_write_failure_reason(exc, d)} while writing {path}") from exc
        raise


def remove_stale_temporary_files(directory: str) -> list[str]:
    """Delete the temporary files (``.<name>.<random>.tmp``) a killed write left in ``directory``."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(".") and name.endswith(TMP_SUFFIX) and name.count(".") >= 3:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    os.unlink(path)
                    removed.append(name)
                except OSError:
                    pass
    return removed


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_np_save(path: str, array) -> None:
    atomic_write(path, lambda f: np.save(f, np.asarray(array)))


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
    """The checkpoint dict of ``path``; :class:`CheckpointError` (one line) when it is not one.

    ``weights_only``: no arbitrary objects are unpickled (our checkpoints and the official ones are plain
    data); that protection stays on, and a file that needs it off is refused like a damaged one.
    """
    try:
        with warnings.catch_warnings():  # torch's notes on unusual pickles would precede the one-line error
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # the file cannot be read at all: the caller says so
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail the unpickler in any of many ways (KeyError...)
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged, truncated, or not a torch.save file "
                              f"of tensors and plain data; {type(exc).__name__})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a readable checkpoint (it holds a {type(ckpt).__name__}, "
                              "not a dict)")
    if "state_dict" not in ckpt:
        # a bare state dict
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path} is not a readable checkpoint ('state_dict' is not a dict)")
    return ckpt


# Parameter names that only one latent space has (official layout, without "module.").
_LATENT_SPACE_MARKERS = {
    "linear": ("clip.prefix_text_prompt_proj_layer.", "clip.postfix_text_prompt_proj_layer."),
    "transformer": ("clip.unified_prompt_embedding.", "clip.PromptTransformer.", "clip.unified_prompt_mlp."),
}


def checkpoint_latent_space(ckpt: dict) -> str | None:
    """'linear' or 'transformer': the shared latent space a DGL checkpoint was trained with (None: unknown)."""
    names = [k[len("module."):] if k.startswith("module.") else k for k in ckpt.get("state_dict", {})]
    found = [space for space, prefixes in _LATENT_SPACE_MARKERS.items()
             if any(n.startswith(prefixes) for n in names)]
    return found[0] if len(found) == 1 else None


def is_own_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT
