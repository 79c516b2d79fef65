"""Reading DGL checkpoint files: ours and the published ones (``torch.save`` dicts whose ``state_dict``
holds "module." + the official parameter names). Writing them is the training program's business
(``training.checkpoint``)."""
from __future__ import annotations

import warnings

import torch


FORMAT = "dgl-reimpl-1"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model; the message is one line."""


def with_module_prefix(sd: dict) -> dict:
    return {(k if k.startswith("module.") else "module." + k): v for k, v in sd.items()}


def strip_module_prefix(sd: dict) -> dict:
    """The state dict without DistributedDataParallel's "module." before its names (official checkpoints have it)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


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
    names = strip_module_prefix(ckpt.get("state_dict", {}))
    found = [space for space, prefixes in _LATENT_SPACE_MARKERS.items()
             if any(n.startswith(prefixes) for n in names)]
    return found[0] if len(found) == 1 else None


def is_own_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT
