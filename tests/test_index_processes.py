"""`search_videos.py index` split between processes: the shares, the manifest written once every share is
done, an index equal to the one-process index (entry by entry, feature by feature), a killed process resumed,
and bad input (other flags on one process, a full disk on one process)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from retrieval import VideoIndex
from retrieval.encode import assign_shares
from retrieval.index import GroupError
from retrieval.model_io import SearchError
from runtime.group import Group
from tests.search_fixtures import NUM_VIDEOS, write_search_videos_script

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ shares
def check_shares(weights, batch_size, processes):
    shares = assign_shares(weights, batch_size, processes)
    assert len(shares) == processes
    assert shares[0][0] == 0 and shares[-1][1] == len(weights)  # complete ...
    for (lo, hi), (next_lo, _) in zip(shares, shares[1:]):
        assert lo <= hi == next_lo  # ... contiguous and disjoint
    for lo, hi in shares:
        assert lo % batch_size == 0 or lo == len(weights)  # whole batches of the one list
    return shares


def test_shares_are_disjoint_complete_and_balanced_by_duration():
    import random

    rng = random.Random(0)
    weights = [rng.uniform(2, 20) for _ in range(1000)]
    batch = 8
    for processes in (1, 2, 3, 8):
        shares = check_shares(weights, batch, processes)
        totals = [sum(weights[lo:hi]) for lo, hi in shares]
        biggest_batch = max(sum(weights[i:i + batch]) for i in range(0, len(weights), batch))
        assert max(totals) - min(totals) <= biggest_batch, (processes, totals)
    # by seconds, not by count: the first half of the list is 10x longer, so its share holds fewer ranges
    weights = [10.0] * 400 + [1.0] * 400
    (lo0, hi0), (lo1, hi1) = check_shares(weights, 4, 2)
    assert hi0 - lo0 < 250 and abs(sum(weights[lo0:hi0]) - sum(weights[lo1:hi1])) <= 40
    # the same inputs give the same shares (every process computes them for itself)
    assert assign_shares(weights, 4, 2) == assign_shares(list(weights), 4, 2)


def test_shares_with_few_items_unknown_durations_and_nothing_to_do():
    shares = check_shares([5.0, 5.0, 5.0], 2, 4)  # two batches for four processes: two get nothing
    assert sorted(hi - lo for lo, hi in shares) == [0, 0, 1, 2]
    shares = check_shares([None, None, 4.0, 4.0], 1, 2)  # unknown: an average one
    assert shares == [(0, 2), (2, 4)]
    assert assign_shares([], 8, 3) == [(0, 0), (0, 0), (0, 0)]


# ------------------------------------------------------------------------------------------ threads as processes
class ThreadGroup(Group):
    """A group whose processes are threads of this process (the exchange torch.distributed does, by a
    barrier); ``calls[rank]`` counts each member's exchanges."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self.shared = rank, shared["n"], shared

    def gather(self, obj) -> list:
        shared = self.shared
        shared["calls"][self.rank] += 1
        shared["slots"][self.rank] = obj
        shared["barrier"].wait()
        out = list(shared["slots"])
        shared["barrier"].wait()
        return out

    def broadcast(self, obj, src: int = 0):
        return self.gather(obj)[src]


def run_in_threads(n: int, fn) -> list:
    """fn(group) in n threads; their results (or exceptions)."""
    shared = {"n": n, "calls": [0] * n, "slots": [None] * n, "barrier": threading.Barrier(n, timeout=120)}
    results = [None] * n

    def member(rank):
        try:
            results[rank] = fn(ThreadGroup(rank, shared))
        except BaseException as err:  # noqa: BLE001 - handed to the test
            results[rank] = err

    threads = [threading.Thread(target=member, args=(r,), name=f"member-{r}") for r in range(n)]
    for t in threads:
        t.start()
    return threads, results, shared


def build(loaded, videos, index_dir, group=None, **kw):
    return VideoIndex.build(loaded.model, [videos], index_dir=str(index_dir), tokenizer=loaded.tokenizer,
                            batch_size=2, shard_size=2, precision="fp32", log=None, group=group, **kw)


def rows(index_dir) -> list:
    index = VideoIndex.open(str(index_dir))
    features = index.features()
    return [(e, features[i]) for i, e in enumerate(index.entries)]


def assert_same(a: list, b: list, ordered: bool = True) -> None:
    if not ordered:
        def key(row):
            return row[0]["path"], tuple(row[0]["segment"])
        a, b = sorted(a, key=key), sorted(b, key=key)
    assert [e for e, _ in a] == [e for e, _ in b]
    for (entry, fa), (_, fb) in zip(a, b):
        assert torch.equal(fa, fb), entry["path"]


def test_the_manifest_waits_for_every_share_and_the_index_equals_one_process(world, loaded, tmp_path):
    """Process 1 is held after its first shard: process 0 has finished its share and waits, its shards are
    on disk, and the manifest lists none of them; once process 1 finishes, the manifest lists every shard,
    and the index is the one-process index, entry by entry (in order) and feature by feature."""
    one = tmp_path / "one"
    build(loaded, world.videos, one)
    two = tmp_path / "two"
    wrote, release = threading.Event(), threading.Event()

    def on_shard(path):
        if threading.current_thread().name == "member-1" and not wrote.is_set():
            wrote.set()
            assert release.wait(120)

    threads, results, shared = run_in_threads(2, lambda g: build(loaded, world.videos, two, group=g,
                                                                 on_shard=on_shard))
    try:
        assert wrote.wait(120)
        for _ in range(1200):  # process 0 is waiting for the others after its share (its third exchange)
            if shared["calls"][0] >= 3:
                break
            threading.Event().wait(0.1)
        assert shared["calls"][0] == 3 and shared["calls"][1] == 2
        on_disk = sorted(p.name for p in (two / "shards").glob("shard-*.npz"))
        assert len(on_disk) >= 2  # process 0's shards and process 1's first one
        assert json.loads((two / "index.json").read_text())["shards"] == []
        with pytest.raises(SearchError, match="is empty"):
            VideoIndex.open(str(two))
    finally:
        release.set()
        for t in threads:
            t.join(120)
    assert isinstance(results[0], VideoIndex) and results[1] is None, results
    manifest = json.loads((two / "index.json").read_text())
    assert manifest["shards"] == sorted(p.name for p in (two / "shards").glob("shard-*.npz"))
    assert len(rows(two)) == NUM_VIDEOS
    assert_same(rows(two), rows(one))


def test_ranges_of_files_split_between_processes_equal_one_process(world, loaded, tmp_path):
    """Files cut into time ranges (windows): the processes plan every other file, share the ranges, and the
    index is the one-process index."""
    from retrieval.segments import Segmentation

    windows = Segmentation(mode="windows", window=2, stride=1)
    videos = os.path.join(world.videos, "more")  # 3 of the videos
    one = tmp_path / "one"
    build(loaded, videos, one, segmentation=windows)
    threads, results, _ = run_in_threads(2, lambda g: build(loaded, videos, tmp_path / "two", group=g,
                                                            segmentation=windows))
    for t in threads:
        t.join(120)
    assert isinstance(results[0], VideoIndex) and results[1] is None, results
    two = rows(tmp_path / "two")
    assert len(two) > 3 and {e["segment"][1] for e, _ in two} != {1}
    assert_same(two, rows(one))


def test_a_failed_write_on_one_process_changes_nothing_and_the_rerun_completes(world, loaded, tmp_path, monkeypatch):
    """A full disk on process 1 (its shard write raises ENOSPC): every process stops with process 1's
    reason, the index (an existing one, grown by new videos) is as it was; the same build then completes."""
    import shutil

    import retrieval.index as index_module

    videos = tmp_path / "videos"
    shutil.copytree(world.videos, videos)
    idx = tmp_path / "idx"
    build(loaded, str(videos / "more"), idx)  # 3 videos
    before = (idx / "index.json").read_bytes(), rows(idx)
    real_write = index_module.write_shard

    def write_shard(path, features, entries):
        if threading.current_thread().name == "member-1":
            def full(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return index_module.atomic_write(path, full)
        return real_write(path, features, entries)

    monkeypatch.setattr(index_module, "write_shard", write_shard)
    threads, results, _ = run_in_threads(2, lambda g: build(loaded, str(videos), idx, group=g))
    for t in threads:
        t.join(120)
    for err in results:
        assert isinstance(err, GroupError), results
        assert str(err).startswith("process 1 of 2: no space left on device while writing ") and \
            "nothing was committed: the index is as it was" in str(err), str(err)
    assert (idx / "index.json").read_bytes() == before[0]
    assert_same(rows(idx), before[1])
    monkeypatch.setattr(index_module, "write_shard", real_write)
    threads, results, _ = run_in_threads(2, lambda g: build(loaded, str(videos), idx, group=g))
    for t in threads:
        t.join(120)
    assert isinstance(results[0], VideoIndex), results
    assert len(rows(idx)) == NUM_VIDEOS


# ------------------------------------------------------------------------------------------ torchrun
# search_videos.py as torchrun runs it, with fixed kernels so that the runs compared compute the same way,
# and faults on demand (search_fixtures.SEARCH_VIDEOS_SCRIPT).
@pytest.fixture(scope="module")
def run_script(tmp_path_factory):
    return write_search_videos_script(tmp_path_factory.mktemp("script"))


def index_command(world, index_dir, *extra) -> list[str]:
    return ["index", world.videos, "--index", str(index_dir), *world.model_args(), "--workers", "0", "--threads", "1",
            "--precision", "fp32", "--shard_size", "2", "--batch_size", "2", "--no_progress", *extra]


def run_processes(run_script, world, index_dir, processes: int, *extra, env=None, per_rank=None):
    """`torchrun --nproc_per_node N search_videos.py index ...` (1: plain python); per_rank: {rank: extra flags}
    started as processes of their own (as on several machines)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if per_rank:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(processes):
            penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, run_script, *index_command(world, index_dir, *extra, *per_rank.get(rank, []))]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        done = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done
    if processes == 1:
        cmd = [sys.executable, run_script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               run_script]
    return subprocess.run(cmd + index_command(world, index_dir, *extra), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(run_script, world, tmp_path_factory):
    idx = tmp_path_factory.mktemp("reference") / "idx"
    done = run_processes(run_script, world, idx, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    return rows(idx)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(run_script, world, reference, tmp_path):
    idx = tmp_path / "idx"
    done = run_processes(run_script, world, idx, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"index {idx}: {NUM_VIDEOS} entries of {NUM_VIDEOS} videos" in done.stdout
    assert done.stdout.count("index ") == 1  # process 0 reports for the run
    assert_same(rows(idx), reference)


@pytest.mark.slow
def test_torchrun_killed_process_resumes_to_the_same_index(run_script, world, reference, tmp_path):
    """Process 1 is killed writing its first shard (torchrun then stops process 0): no manifest lists a
    shard; the same command finishes the index, and so does a resumed run with another process count."""
    for resume_with in (2, 1):
        idx = tmp_path / f"idx{resume_with}"
        killed = run_processes(run_script, world, idx, 2, env={"KILL_RANK": "1", "KILL_SHARD": "1"})
        assert killed.returncode != 0
        assert json.loads((idx / "index.json").read_text())["shards"] == []
        done = run_processes(run_script, world, idx, resume_with)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same(rows(idx), reference, ordered=False)


def one_error_line(done) -> str:
    lines = [line for p in done for line in p.stderr.strip().splitlines()]
    assert len(lines) == 1 and lines[0].startswith("search_videos.py: error: "), lines
    assert [p.returncode for p in done] == [2] * len(done), [p.stderr[-2000:] for p in done]
    return lines[0]


@pytest.mark.slow
def test_processes_started_with_other_flags_are_refused_before_writing(run_script, world, tmp_path):
    idx = tmp_path / "idx"
    done = run_processes(run_script, world, idx, 2, per_rank={1: ["--max_len", "30"]})
    line = one_error_line(done)
    assert "process 1 of 2 was started with other flags than process 0: --max_len 30 (process 0: None)" in line
    assert not idx.exists()


@pytest.mark.slow
def test_a_full_disk_on_one_process_is_one_line_and_changes_nothing(run_script, world, reference, tmp_path):
    idx = tmp_path / "idx"
    done = run_processes(run_script, world, idx, 2, env={"FULL_RANK": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("search_videos.py: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("search_videos.py: error: process 1 of 2: no space left on device while writing ")
    assert "nothing was committed: the index is as it was" in errors[0]
    assert json.loads((idx / "index.json").read_text())["shards"] == []
    done = run_processes(run_script, world, idx, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(rows(idx), reference, ordered=False)


# ------------------------------------------------------------------------------------------ --compile
def test_compile_is_recorded_and_an_update_with_the_other_choice_is_refused(world, tmp_path, capsys, monkeypatch):
    """--compile changes the features' rounding: the index records it, and a later run into the index that
    chooses otherwise is refused in one line, the index untouched. (The compilation itself is replaced by
    the plain encoder here: tests/test_index_processes.py's slow test compiles.)"""
    import retrieval.encode as encode_module
    from tests.search_fixtures import one_line_error, run_cli

    import modules.backends as backends
    from modules.backends import Fp32Check

    monkeypatch.setattr(encode_module.torch, "compile", lambda fn, **kw: fn)
    # no kernel timing: one candidate each (MKL products, PyTorch's attention choice), and a timing would fail
    monkeypatch.setattr(backends, "_cached_fp32_check",
                        lambda threads: Fp32Check(exact=False, error_mkl=0.0, error_onednn=0.0, speedup=0.0))
    monkeypatch.setattr(backends, "_cached_attention_times",
                        lambda shape, dtype, threads: {("flash", "eval"): 1.0, ("math", "eval"): 2.0})
    monkeypatch.setattr(backends, "time_candidates", None)
    idx = tmp_path / "idx"
    argv = ["index", world.videos, "--index", idx, *world.model_args(), "--workers", 0, "--precision", "fp32",
            "--no_progress"]
    code, out, err = run_cli(argv + ["--compile"], capsys)
    assert code == 0, err
    assert json.loads((idx / "index.json").read_text())["kernels"]["compiled"] is True
    before = (idx / "index.json").read_bytes()
    one_line_error(argv, capsys, f"the index {idx} was computed with --compile", "run with it")
    assert (idx / "index.json").read_bytes() == before
    import shutil

    plain = tmp_path / "plain"  # the same index as a run without --compile records it
    shutil.copytree(idx, plain)
    meta = json.loads((plain / "index.json").read_text())
    del meta["kernels"]["compiled"]
    (plain / "index.json").write_text(json.dumps(meta))
    one_line_error(["index", world.videos, "--index", plain, *argv[4:], "--compile"], capsys,
                   f"the index {plain} was computed without --compile", "run without it")


@pytest.mark.slow
def test_compiled_encoder_gives_the_plain_features_to_rounding(run_script, world, reference, tmp_path):
    idx = tmp_path / "idx"
    done = run_processes(run_script, world, idx, 1, "--compile")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile: video encoder, batch 2x" in done.stderr
    compiled = rows(idx)
    assert [e for e, _ in compiled] == [e for e, _ in reference]
    for (_, a), (_, b) in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
