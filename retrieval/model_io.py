"""Load a DGL for searching (CLIP weights + a DGL checkpoint), and identify a model by its weights.

Our checkpoints record the model flags (``ckpt["config"]``); official DGL checkpoints do not, so their
flags come from the caller (the command line). Explicit flags win over recorded ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from modules.dgl import DGL, DGLConfig
from runtime.errors import first_line
from runtime.model_flags import MODEL_FLAGS, model_flag_error


class SearchError(Exception):
    """Bad input for indexing or searching; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    model: DGL
    tokenizer: object
    info: dict = field(default_factory=dict)  # what the index records: fingerprint, config, file paths


def model_fingerprint(model: DGL) -> str:
    """sha256 of the model configuration and every weight (CLIP and prompts), as fp32 bytes.

    Two models give the same video features for the same pixels exactly when their fingerprints match.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32 if state[name].is_floating_point() else None)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def describe_model(model: DGL, **paths) -> dict:
    """The model record an index keeps: fingerprint, DGL and CLIP configuration, file paths (if any)."""
    return {"fingerprint": model_fingerprint(model), "dgl_config": model.config.to_dict(),
            "clip_config": model.clip.config.to_dict(),
            **{k: (os.path.abspath(v) if v else None) for k, v in paths.items()}}


def load_model(clip_path: str, checkpoint: str | None, bpe_path: str | None = None,
               flags: dict | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """DGL on ``clip_path`` with the prompts of ``checkpoint`` (None: untrained prompts), in eval mode.

    ``flags``: DGL options (the published flag names); None values are taken from the checkpoint's
    recorded configuration, then DGLConfig's defaults. Every failure is a one-line SearchError.
    """
    from modules.tokenizer import get_tokenizer
    from modules.checkpoints import load_checkpoint_file

    if not clip_path or not os.path.isfile(clip_path):
        raise SearchError(f"CLIP weights not found: {clip_path} (pass --clip <ViT-B-32.pt or a state dict>)")
    ckpt: dict = {}
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise SearchError(f"DGL checkpoint not found: {checkpoint}")
        try:
            ckpt = load_checkpoint_file(checkpoint)
        except Exception as err:  # noqa: BLE001 - reported as one line naming the file
            raise SearchError(f"cannot read the checkpoint {checkpoint}: {first_line(err)}") from err
    options = DGLConfig.recorded_in(ckpt)
    options.update({k: v for k, v in (flags or {}).items() if v is not None and k in MODEL_FLAGS})
    problem = model_flag_error(argparse.Namespace(**options))  # main.py's check of the same flags
    if problem:
        raise SearchError(problem)
    try:
        model = DGL.from_pretrained(clip_path, **options)
    except Exception as err:  # noqa: BLE001
        raise SearchError(f"cannot build DGL on {clip_path}: {first_line(err)}") from err
    if checkpoint:
        try:
            model.load_checkpoint(ckpt)
        except Exception as err:  # noqa: BLE001
            raise SearchError(f"cannot load {checkpoint}: {first_line(err)} (the model flags must match "
                              "the checkpoint: --shared_latent_space, --max_frames, ...)") from err
    recorded_bpe = (ckpt.get("config") or {}).get("bpe_path") if isinstance(ckpt.get("config"), dict) else None
    try:
        tokenizer = get_tokenizer(bpe_path=bpe_path or (recorded_bpe if recorded_bpe and os.path.isfile(recorded_bpe)
                                                        else None),
                                  pretrained_dir=os.path.dirname(os.path.abspath(clip_path)))
    except FileNotFoundError as err:
        raise SearchError(first_line(err)) from err
    vocab = model.clip.config.vocab_size
    if getattr(tokenizer, "vocab_size", vocab) > vocab:
        raise SearchError(f"the BPE vocabulary has {tokenizer.vocab_size} tokens but the CLIP in {clip_path} "
                          f"embeds only {vocab}; pass the vocabulary it was trained with (--bpe_path)")
    model.eval().to(device)
    info = describe_model(model, clip_weights=clip_path, checkpoint=checkpoint,
                          bpe_path=getattr(tokenizer, "path", None) or bpe_path)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
