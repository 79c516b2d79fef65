"""Shared fixtures: where ../shared is, CLIP's BPE file, tiny random CLIPs, the search tests' world."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("DGL_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set DGL_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def annotations_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "annotations"
    if not path.is_dir():
        pytest.skip(f"annotation files not found at {path}")
    return path


@pytest.fixture(scope="session")
def bpe_path(shared_dir) -> str:
    path = shared_dir / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        pytest.skip(f"CLIP's BPE vocabulary not found at {path}; it is not shipped with the project")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The search tests' tiny searchable world (tests/search_fixtures.py), made anew for each module that asks
    for it: what the tests of one module add to it, another module's never see. A module that needs more in
    its world defines its own ``world``."""
    from tests.search_fixtures import make_world

    return make_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def loaded(world):
    """The world's model (retrieval.model_io.LoadedModel), loaded once for the module."""
    return world.model()


@pytest.fixture
def tiny_clip():
    """A small random CLIP (2+2 layers, width 128, 2 heads, 32 px, 8 px patches)."""
    from modules.clip import CLIP, tiny_clip_config

    torch.manual_seed(0)
    return CLIP(tiny_clip_config()).eval()
