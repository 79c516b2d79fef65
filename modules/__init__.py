"""DGL library: the CLIP backbone, the tokenizer, the DGL model and retrieval metrics.

The names below are imported on first use, so that importing one torch-free part (``modules.dgl_config``,
which the command lines read to build their flags) does not import torch with the rest."""
from importlib import import_module

_HOMES = {"CLIP": "clip", "CLIPConfig": "clip", "build_clip": "clip", "load_clip_state_dict": "clip",
          "tiny_clip_config": "clip", "DGL": "dgl", "DGLConfig": "dgl_config", "SimpleTokenizer": "tokenizer",
          "get_tokenizer": "tokenizer", "tokenize": "tokenizer"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
