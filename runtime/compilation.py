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
"""
from __future__ import annotations

import os

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

# micro-batches of training (all epochs) from which --compile auto compiles
AUTO_COMPILE_MIN_STEPS = 500


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
