"""Shared fixtures: where ../shared is, CLIP's BPE file, tiny random CLIPs."""
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


@pytest.fixture
def tiny_clip():
    """A small random CLIP (2+2 layers, width 128, 2 heads, 32 px, 8 px patches)."""
    from modules.clip import CLIP, tiny_clip_config

    torch.manual_seed(0)
    return CLIP(tiny_clip_config()).eval()
