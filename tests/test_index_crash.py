"""An index folder survives a process killed in the middle of writing a file: the index opens, the next
`search_videos.py index` removes the torn temporary files and ends with the same index, bit for bit, as one
uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval import VideoIndex
from tests.search_fixtures import NUM_VIDEOS, write_search_videos_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    return write_search_videos_script(tmp_path_factory.mktemp("script"))


def index_run(world, script, index_dir, kill_at=0, kill_name=""):
    """`search_videos.py index` in a process of its own (search_fixtures.SEARCH_VIDEOS_SCRIPT), killed on the
    ``kill_at``-th write of a file named ``...kill_name`` when asked."""
    env = dict(os.environ, KILL_AT=str(kill_at), KILL_NAME=kill_name)
    cmd = [sys.executable, script, "index", world.videos, "--index", str(index_dir), *world.model_args(),
           "--workers", "0", "--precision", "fp32", "--shard_size", "2", "--batch_size", "2",
           "--no_progress"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def temporary_files(index_dir) -> list[str]:
    return sorted(p.name for p in Path(index_dir).rglob("*.tmp"))


def contents(index_dir) -> dict:
    index = VideoIndex.open(str(index_dir))
    feats = index.features()
    return {e["path"]: (e, feats[i]) for i, e in enumerate(index.entries)}


@pytest.fixture(scope="module")
def reference(world, script, tmp_path_factory):
    """One uninterrupted run."""
    ref = tmp_path_factory.mktemp("ref") / "idx"
    r = index_run(world, script, ref)
    assert r.returncode == 0, r.stderr[-3000:]
    return contents(ref)


def same_as_reference(found: dict, reference: dict) -> None:
    for path, (entry, feature) in found.items():
        assert entry == reference[path][0] and torch.equal(feature, reference[path][1]), path


def test_sigkill_during_writes_then_rerun(world, script, reference, tmp_path):
    idx = tmp_path / "idx"
    # 1. killed while writing the second shard: the first one (2 videos) survives, the torn file is a .tmp
    killed = index_run(world, script, idx, kill_at=2, kill_name=".npz")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    torn = temporary_files(idx)
    assert len(torn) == 1 and torn[0].startswith(".shard-") and (idx / "shards" / torn[0]).is_file()
    partial = contents(idx)
    assert len(partial) == 2
    same_as_reference(partial, reference)

    # 2. the rerun encodes the rest and is killed while writing the manifest: every shard is complete
    killed = index_run(world, script, idx, kill_at=1, kill_name="index.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    torn = temporary_files(idx)
    assert len(torn) == 1 and torn[0].startswith(".index.json.") and (idx / torn[0]).is_file()
    complete = contents(idx)
    assert sorted(complete) == sorted(reference)
    same_as_reference(complete, reference)

    # 3. a clean rerun: nothing torn is left, the index is the uninterrupted run's
    done = index_run(world, script, idx)
    assert done.returncode == 0, done.stderr[-3000:]
    assert temporary_files(idx) == []
    final = contents(idx)
    assert sorted(final) == sorted(reference) and len(final) == NUM_VIDEOS
    same_as_reference(final, reference)


def test_stale_temporary_files_are_removed(world, tmp_path):
    """Temporary files a killed run left (in the folder and in shards/) go on the next run; other files stay."""
    loaded = world.model()
    idx = tmp_path / "idx"
    VideoIndex.build(loaded.model, [world.videos], index_dir=str(idx), precision="fp32", shard_size=4, log=None)
    stale = [idx / ".index.json.k3j9x2.tmp", idx / ".failed.json.0a1b2c.tmp",
             idx / "shards" / ".shard-000007.npz.a8b7c6.tmp"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 half a file")
    keep = [idx / "notes.txt", idx / "shards" / "README"]
    for p in keep:
        p.write_text("mine\n")
    VideoIndex.build(loaded.model, [world.videos], index_dir=str(idx), precision="fp32", shard_size=4, log=None)
    assert [p.exists() for p in stale] == [False, False, False]
    assert [p.read_text() for p in keep] == ["mine\n", "mine\n"]
    assert len(VideoIndex.open(str(idx))) == NUM_VIDEOS


def test_an_update_computes_with_the_kernels_the_index_recorded(world, tmp_path, capsys, monkeypatch):
    """The first `index` run times the attention backend and the fp32 product path and records them; a
    later run into the same index uses the recorded ones, whatever its own timing would say, so the
    entries of a grown or resumed index are computed as one run computes them."""
    import json

    import modules.backends as backends
    import retrieval.index as index_module
    from modules.backends import MATH, Fp32Check, current_attention_backends
    from tests.test_search_videos import index_cli

    timed, seen = [], []

    def timing_says(winner):
        """Math attention and oneDNN products are candidates; the whole-model timing makes ``winner`` fastest."""
        times = {("math", "eval"): 1.0, ("math", "train"): 1.0, ("flash", "eval"): 2.0, ("flash", "train"): 2.0}
        monkeypatch.setattr(backends, "_cached_attention_times", lambda shape, dtype, threads: times)
        monkeypatch.setattr(backends, "_cached_fp32_check",
                            lambda threads: Fp32Check(exact=True, error_mkl=0.0, error_onednn=0.0, speedup=1.5))

        def time_candidates(runs, rounds):
            timed.append(sorted(runs))
            return {name: 0.5 if name == winner else 1.0 for name in runs}
        monkeypatch.setattr(backends, "time_candidates", time_candidates)

    real_encode = index_module.encode_batch

    def encode(model, video, mask, dtype):  # the settings the entries are computed under
        seen.append((current_attention_backends()[0], torch.backends.mkldnn.matmul.fp32_precision))
        return real_encode(model, video, mask, dtype)
    monkeypatch.setattr(index_module, "encode_batch", encode)

    idx = tmp_path / "idx"
    timing_says("onednn + math")
    code, out, err = index_cli(world, os.path.join(world.videos, "more"), str(idx), capsys)
    assert code == 0, err
    assert "kernels: attention math, fp32 products onednn (chosen by timing" in out
    kernels = json.loads((idx / "index.json").read_text())["kernels"]
    assert kernels == {"device": "cpu", "attention": "math", "fp32_products": "onednn"}
    first = set(seen)
    assert first == {(MATH, "bf16")}  # oneDNN's route for fp32 products

    # the timing now says PyTorch's defaults: the update keeps the recorded kernels
    seen.clear()
    timed.clear()
    timing_says("mkl + PyTorch's choice")
    code, out, err = index_cli(world, world.videos, str(idx), capsys)
    assert code == 0, err
    assert "kernels: attention math, fp32 products onednn (as recorded in the index)" in out
    assert timed == [] and seen and set(seen) == first
    assert json.loads((idx / "index.json").read_text())["kernels"] == kernels

    # a new index times them afresh
    seen.clear()
    code, out, err = index_cli(world, world.videos, str(tmp_path / "other"), capsys)
    assert code == 0, err
    assert "kernels: attention PyTorch's choice, fp32 products mkl (chosen by timing" in out
    assert timed and set(seen) == {(current_attention_backends()[0], "none")}
