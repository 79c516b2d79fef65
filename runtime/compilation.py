"""torch.compile without paying for it on every run: PyTorch's own compilation caches (Inductor's FX graph
cache and AOTAutograd's cache, both on by default in PyTorch) kept under the user's cache directory instead of
a temporary folder, and the ``--compile auto`` rule of when compiling pays.

* The cache folder: ``$TORCHINDUCTOR_CACHE_DIR`` where set; else ``$XDG_CACHE_HOME/dgl/torch-compile`` (or
  ``~/.cache/dgl/torch-compile``). A shape compiled once there is loaded from it by later runs (seconds
  instead of 15-50 s on a 2-core CPU; docs/library-speed.md).
* ``--compile auto``: compile the encoders for training runs of at least :data:`AUTO_COMPILE_MIN_STEPS`
  micro-batches: at 1.1-1.26x the eager speed a training step of about a second saves 0.1-0.2 s, so the
  15-50 s of a first compilation are covered after a few hundred steps; shorter runs and runs that only
  evaluate stay eager.
* ``search_videos.py index --compile auto``: compile the video encoder when the process with the largest
  share encodes at least :data:`INDEX_AUTO_MIN_RANGES` ranges, or :data:`INDEX_AUTO_MIN_RANGES_WARM` where
  this cache folder holds the graphs of the same shape already (recorded in :data:`WARM_SHAPES_FILE` by a
  compiled run); both measured with ``benchmarks/bench_index_compile.py`` (docs/library-speed.md).
"""
from __future__ import annotations

import hashlib
import json
import os

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

# micro-batches of training (all epochs) from which --compile auto compiles
AUTO_COMPILE_MIN_STEPS = 500


# ranges one index process encodes from which --compile auto compiles its video encoder: with an empty
# compile cache, and with the cache holding the same shape. The measured break-even points rounded up (497
# and 286 ranges: benchmarks/bench_index_compile.py, docs/library-speed.md): one compilation per process
# (a smaller batch is padded to the run's batch size, retrieval.encode.compile_video_encoder), the last
# batch counted as padded by all but one range.
INDEX_AUTO_MIN_RANGES = 500
INDEX_AUTO_MIN_RANGES_WARM = 300

# the shapes a compiled run has stored in the cache folder (keys of :func:`shape_key`)
WARM_SHAPES_FILE = "dgl-compiled-shapes.json"


def compile_choice(text: str):
    """A --compile value: 0, 1 or auto."""
    import argparse

    if text in ("0", "1"):
        return int(text)
    if text == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 0, 1, auto)")


def cache_dir() -> str:
    """The compile cache folder :func:`use_compile_cache` uses (nothing is created)."""
    return os.path.abspath(os.environ.get(CACHE_ENV) or default_cache_dir())


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dgl", "torch-compile")


def use_compile_cache(directory: str | None = None) -> str:
    """Keep PyTorch's compilation caches in ``directory`` (default: $TORCHINDUCTOR_CACHE_DIR where set, else
    :func:`default_cache_dir`) and make sure they are on; returns the folder. Call before the first
    compilation: Inductor fixes its folder at its first use."""
    if directory is None:
        directory = os.environ.get(CACHE_ENV) or default_cache_dir()
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    os.environ[CACHE_ENV] = directory
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return directory


def auto_compile(training_steps: int) -> tuple[bool, str]:
    """(compile?, one line saying why) of ``--compile auto`` for a run of ``training_steps`` micro-batches
    of training (0: evaluation only)."""
    if training_steps >= AUTO_COMPILE_MIN_STEPS:
        return True, (f"--compile auto: compiling the encoders ({training_steps} training steps >= "
                      f"{AUTO_COMPILE_MIN_STEPS}: the measured 1.1-1.26x covers 15-50 s of compilation, seconds "
                      f"with a warm cache)")
    what = f"{training_steps} training steps < {AUTO_COMPILE_MIN_STEPS}" if training_steps else "no training"
    return False, f"--compile auto: eager ({what}: too short for compilation to pay)"


def _model_sources_digest() -> str:
    """The model code (modules/*.py): a change to it changes the compiled graphs."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modules")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def shape_key(**parts) -> str:
    """A key of one compiled shape: ``parts`` (model sizes, batch shape, dtype, device), PyTorch's version and
    the model code."""
    import torch

    described = json.dumps({**parts, "torch": torch.__version__, "code": _model_sources_digest()},
                           sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()


def _warm_shapes(directory: str) -> dict:
    try:
        with open(os.path.join(directory, WARM_SHAPES_FILE), encoding="utf-8") as f:
            shapes = json.load(f)
        return shapes if isinstance(shapes, dict) else {}
    except (OSError, ValueError):
        return {}


def is_warm(key: str, directory: str | None = None) -> bool:
    """Whether a compiled run stored the graphs of ``key`` in the cache folder (default: :func:`cache_dir`)."""
    return key in _warm_shapes(directory or cache_dir())


def mark_warm(key: str, directory: str | None = None) -> None:
    """Record that the cache folder now holds the graphs of ``key`` (written atomically)."""
    from runtime.files import atomic_write_text

    directory = directory or cache_dir()
    shapes = _warm_shapes(directory)
    if key in shapes:
        return
    import time

    shapes[key] = time.time()
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, WARM_SHAPES_FILE), json.dumps(shapes, indent=1))


def auto_compile_index(ranges: int, warm: bool, processes: int = 1) -> tuple[bool, str]:
    """(compile?, one line saying why) of ``search_videos.py index --compile auto`` for a run whose process
    with the largest share (of ``processes``) encodes ``ranges`` ranges, with the compile cache warm for the
    shape or not."""
    needed = INDEX_AUTO_MIN_RANGES_WARM if warm else INDEX_AUTO_MIN_RANGES
    cache = "the compile cache holds this shape" if warm else "nothing of this shape in the compile cache"
    count = f"{ranges} ranges to encode" + (f" in the largest of {processes} shares" if processes > 1 else "")
    if ranges >= needed:
        return True, (f"--compile auto: compiling the video encoder ({count} >= {needed}; {cache}: the measured "
                      "gain covers the compilation)")
    return False, f"--compile auto: eager ({count} < {needed}; {cache}: too short for compilation to pay)"
