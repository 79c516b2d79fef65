"""The model's flags on the command lines (main.py, search_videos.py), made from DGLConfig's fields: the
same names, defaults, choices, bounds and help in every program, and DGLConfig's one check of their values."""
from __future__ import annotations

from dataclasses import fields

from modules.dgl_config import DGLConfig  # torch-free: --help and bad flags answer without importing torch

MODEL_FLAGS = tuple(f.name for f in fields(DGLConfig))
_TYPES = {"int": int, "str": str, "bool": int}  # a bool field is a 0/1 flag, as in the published scripts


def flag(name: str) -> str:
    return "--" + name


def add_model_flags(group, defaults: bool = True) -> None:
    """One flag per DGLConfig field on ``group`` (an argparse parser or group). ``defaults``: DGLConfig's
    defaults (main.py); else None, meaning "as the checkpoint records it, else DGLConfig's default"."""
    for f in fields(DGLConfig):
        meta = f.metadata
        choices = meta["choices"]
        if f.type == "bool":
            choices = (0, 1)
        default = (int(f.default) if f.type == "bool" else f.default) if defaults else None
        bound = f" (>= {meta['minimum']})" if meta["minimum"] is not None else ""
        group.add_argument(flag(f.name), *map(flag, meta["aliases"]), dest=f.name, type=_TYPES[f.type],
                           default=default, choices=list(choices) if choices is not None else None,
                           help=meta["help"] + bound)


def model_flag_error(values) -> str | None:
    """The one-line problem DGLConfig finds in the model flags of ``values`` (a namespace of flags; None
    values take the defaults), flags spelled as on the command line; None when the model can take them."""
    given = {name: getattr(values, name) for name in MODEL_FLAGS if getattr(values, name, None) is not None}
    try:
        DGLConfig.check(given, spell=flag)
    except ValueError as e:
        return str(e)
    return None
