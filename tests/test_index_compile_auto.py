"""`search_videos.py index --compile` and `--compile auto`: a compiled run calls its encoder at one batch shape
(a short batch padded, the padded rows dropped); auto is eager for a short run and compiled for a long one
(the thresholds patched; the compilation itself replaced by the plain encoder in the fast tests), decided on
the ranges the run planned (listed and probed once), by process 0 for every process, one log line either way,
a warm compile cache counted, an index's recorded choice kept; and (slow) an auto-compiled index equal to the
eager one to float tolerance."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.search_fixtures import NUM_VIDEOS, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("auto_compile_world")))


@pytest.fixture
def fixed_kernels(monkeypatch):
    """No kernel timing: one candidate each (MKL, PyTorch's attention choice)."""
    import modules.backends as backends
    from modules.backends import Fp32Check

    monkeypatch.setattr(backends, "_cached_fp32_check",
                        lambda threads: Fp32Check(exact=False, error_mkl=0.0, error_onednn=0.0, speedup=0.0))
    monkeypatch.setattr(backends, "_cached_attention_times",
                        lambda shape, dtype, threads: {("flash", "eval"): 1.0, ("math", "eval"): 2.0})


def rows(index_dir) -> list:
    from retrieval import VideoIndex

    index = VideoIndex.open(str(index_dir))
    features = index.features()
    return [(e, features[i]) for i, e in enumerate(index.entries)]


def test_a_compiled_run_pads_its_short_batches_to_one_shape(world, tmp_path, capsys, monkeypatch, fixed_kernels):
    """4 files, one unreadable, in batches of 3: both batches are short, and of different sizes (2: the
    unreadable file's; 1: the last), yet the compiled encoder sees one shape; the entries and features equal
    an eager run's."""
    import retrieval.encode as encode_module
    from tests.search_fixtures import run_cli

    shapes = []

    def compile_recording(fn, **kw):  # stands for torch.compile: the plain encoder, its input shapes recorded
        def compiled(video, mask, *args, **kwargs):
            shapes.append(tuple(video.shape))
            return fn(video, mask, *args, **kwargs)
        return compiled

    monkeypatch.setattr(encode_module.torch, "compile", compile_recording)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    videos = tmp_path / "videos"
    videos.mkdir()
    for spec in world.specs[0::2]:  # the three videos of the top folder
        shutil.copy(os.path.join(world.videos, spec.video_id + ".mp4"), videos)
    (videos / "broken.mp4").write_bytes(b"not a video")  # first in the list; whole files: found unreadable decoding
    argv = [videos, *world.model_args(), "--workers", 0, "--precision", "fp32", "--no_progress", "--batch_size", 3,
            "--segments", "whole"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        code, out, err = run_cli(["index", "--index", tmp_path / name, *argv, *extra], capsys)
        assert code == 0, err
    assert len(shapes) == 2 and set(shapes) == {shapes[0]} and shapes[0][0] == 3, shapes
    compiled, eager = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert len(compiled) == 3 and [e for e, _ in compiled] == [e for e, _ in eager]
    for (_, a), (_, b) in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_rule_for_short_and_long_runs_cold_and_warm(monkeypatch):
    from runtime import compilation

    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 1000)
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES_WARM", 100)
    assert compilation.auto_compile_index(999, warm=False) == (
        False, "--compile auto: eager (999 ranges to encode < 1000; nothing of this shape in the compile cache: "
               "too short for compilation to pay)")
    on, line = compilation.auto_compile_index(1000, warm=False)
    assert on and line.startswith("--compile auto: compiling the video encoder (1000 ranges to encode >= 1000;")
    assert compilation.auto_compile_index(100, warm=True)[0] and not compilation.auto_compile_index(99, warm=True)[0]
    assert "(5 ranges to encode in the largest of 2 shares < 100;" in compilation.auto_compile_index(5, True, 2)[1]


def test_warm_shapes_are_recorded_in_the_cache_folder(tmp_path, monkeypatch):
    from runtime.compilation import WARM_SHAPES_FILE, is_warm, mark_warm, shape_key

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    key = shape_key(use="test", batch=8)
    assert key != shape_key(use="test", batch=4) and key == shape_key(batch=8, use="test")
    assert not is_warm(key)
    mark_warm(key)
    mark_warm(shape_key(use="test", batch=4))
    assert is_warm(key) and len(json.loads((tmp_path / "cache" / WARM_SHAPES_FILE).read_text())) == 2
    (tmp_path / "cache" / WARM_SHAPES_FILE).write_text("not json")  # a damaged record: nothing is warm
    assert not is_warm(key)


def test_index_compile_auto_short_run_eager_long_run_compiled(world, tmp_path, capsys, monkeypatch, fixed_kernels):
    """Two runs of one video: eager under a threshold of 2 ranges, compiled under 1 (recorded in the index,
    and the compile cache folder then counts as warm for the shape)."""
    import retrieval.encode as encode_module
    from retrieval.auto_compile import index_shape_key
    from runtime import compilation
    from tests.search_fixtures import run_cli

    import retrieval.index as index_module

    compiled, recorded_at_shard = [], []
    monkeypatch.setattr(encode_module.torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    real_write_shard = index_module.write_shard

    def write_shard(path, features, entries):  # what a run killed here would leave recorded
        meta = json.loads((Path(path).parent.parent / "index.json").read_text())
        recorded_at_shard.append(meta["kernels"].get("compiled", False))
        return real_write_shard(path, features, entries)

    monkeypatch.setattr(index_module, "write_shard", write_shard)
    video = os.path.join(world.videos, world.specs[0].video_id + ".mp4")
    argv = [video, *world.model_args(), "--workers", 0, "--precision", "fp32", "--no_progress", "--compile", "auto"]

    def index(name):
        code, out, err = run_cli(["index", "--index", tmp_path / name, *argv], capsys)
        assert code == 0, err
        kernels = json.loads((tmp_path / name / "index.json").read_text())["kernels"]
        lines = [line for line in err.splitlines() if line.startswith("--compile auto:")]
        assert len(lines) == 1, err
        return lines[0], kernels.get("compiled", False)

    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 2)
    line, on = index("short")
    assert line == ("--compile auto: eager (1 ranges to encode < 2; nothing of this shape in the compile cache: "
                    "too short for compilation to pay)")
    assert not on and not compiled and recorded_at_shard == [False]
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 1)
    line, on = index("long")
    assert line.startswith("--compile auto: compiling the video encoder (1 ranges to encode >= 1; nothing "
                           "of this shape in the compile cache")
    assert on and len(compiled) == 1
    assert recorded_at_shard == [False, True]  # a new index records the choice before its first shard
    model = world.model().model
    assert compilation.is_warm(index_shape_key(model, torch.device("cpu"), 8, None))
    assert not compilation.is_warm(index_shape_key(model, torch.device("cpu"), 4, None))


def test_compile_auto_counts_a_warm_cache_and_keeps_an_index_record(world, tmp_path, capsys, monkeypatch,
                                                                    fixed_kernels):
    import retrieval.encode as encode_module
    from retrieval.auto_compile import index_shape_key
    from runtime import compilation
    from tests.search_fixtures import run_cli

    monkeypatch.setattr(encode_module.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 100)
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES_WARM", 3)
    argv = [os.path.join(world.videos, "more"), *world.model_args(), "--workers", 0, "--precision", "fp32", "--no_progress", "--compile",
            "auto"]

    def index(name):
        code, out, err = run_cli(["index", "--index", tmp_path / name, *argv], capsys)
        assert code == 0, err
        lines = [line for line in err.splitlines() if line.startswith("--compile auto:")]
        assert len(lines) == 1, err
        return lines[0], json.loads((tmp_path / name / "index.json").read_text())["kernels"].get("compiled", False)

    assert index("cold") == ("--compile auto: eager (3 ranges to encode < 100; nothing of this shape "
                             "in the compile cache: too short for compilation to pay)", False)
    compilation.mark_warm(index_shape_key(world.model().model, torch.device("cpu"), 8, None))
    line, on = index("warm")
    assert on and line.startswith("--compile auto: compiling the video encoder (3 ranges to encode >= 3; the "
                                  "compile cache holds this shape")
    # an index that records a choice keeps it, however long or short the run
    assert index("warm") == ("--compile auto: compiling the video encoder (as the index records: its entries "
                             "were computed compiled)", True)
    assert index("cold") == ("--compile auto: eager (as the index records: its entries were computed eagerly)",
                             False)


def test_the_run_decides_on_the_ranges_it_planned_listing_and_probing_once(world, tmp_path, capsys, monkeypatch,
                                                                           fixed_kernels):
    """Files cut into windows: the one line counts the ranges the run planned and encoded (exact), and the
    run lists the folder once and probes each file once."""
    import retrieval.encode as encode_module
    import retrieval.index as index_module
    from runtime import compilation
    from tests.search_fixtures import run_cli

    calls = {"list": 0, "probe": []}
    real_find, real_probe = encode_module.find_videos, encode_module.probe_frames

    def find_videos(*args, **kwargs):
        calls["list"] += 1
        return real_find(*args, **kwargs)

    def probe_frames(path, *args, **kwargs):
        calls["probe"].append(path)
        return real_probe(path, *args, **kwargs)

    monkeypatch.setattr(encode_module, "find_videos", find_videos)
    monkeypatch.setattr(index_module, "find_videos", find_videos)
    monkeypatch.setattr(encode_module, "probe_frames", probe_frames)
    monkeypatch.setattr(encode_module.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 1000)
    videos = os.path.join(world.videos, "more")  # 3 of the videos
    code, out, err = run_cli(["index", videos, "--index", tmp_path / "idx", *world.model_args(), "--workers", 0,
                              "--precision", "fp32", "--no_progress", "--segments", "windows", "--window", 2,
                              "--stride", 1, "--compile", "auto"], capsys)
    assert code == 0, err
    entries = len(rows(tmp_path / "idx"))
    assert entries > 3
    lines = [line for line in err.splitlines() if line.startswith("--compile auto:")]
    assert lines == [f"--compile auto: eager ({entries} ranges to encode < 1000; nothing of this shape in the "
                     "compile cache: too short for compilation to pay)"], err
    assert calls["list"] == 1 and len(calls["probe"]) == len(set(calls["probe"])) == 3, calls


def _build_with_auto(group, loaded, videos: str, root: str) -> dict:
    """An index build of 2 processes over ``videos`` in batches of 4 with --compile auto (threshold 3): this
    process's log lines and compile calls."""
    from retrieval import VideoIndex
    from retrieval.auto_compile import AutoCompile

    lines, compiles = [], []
    auto = AutoCompile(warm=False, compile=lambda: compiles.append(group.rank), log=lines.append)
    VideoIndex.build(loaded.model, [videos], index_dir=os.path.join(root, "idx"), tokenizer=loaded.tokenizer,
                     batch_size=4, shard_size=4, precision="fp32", log=None, kernels={"device": "cpu"}, group=group,
                     compile_auto=auto)
    return {"lines": lines, "compiles": compiles}


def _gloo_worker(rank: int, processes: int, port: int, root: str, world) -> None:
    from runtime import compilation
    from runtime.group import TorchGroup
    from tests.toy import gloo_member

    compilation.INDEX_AUTO_MIN_RANGES = 3
    loaded = world.model()
    with gloo_member(rank, processes, port):
        result = _build_with_auto(TorchGroup(rank, processes, rank), loaded, world.videos, root)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.parametrize("processes", ["threads", pytest.param("gloo", marks=pytest.mark.slow)])
def test_processes_with_unequal_shares_all_follow_the_largest(world, loaded, tmp_path, monkeypatch, processes):
    """Two processes over 6 videos in batches of 4: shares of 4 and 2 ranges, threshold 3. Process 0 decides
    from the largest share, so both compile (process 1's own share alone would stay eager), and the one line
    comes from process 0. As threads of this process (runtime.group's exchanges by a barrier), and as gloo
    processes (slow: two interpreters start)."""
    from retrieval.encode import assign_shares
    from runtime import compilation

    assert sorted(hi - lo for lo, hi in assign_shares([1.0] * NUM_VIDEOS, 4, 2)) == [2, 4]
    if processes == "gloo":
        import torch.multiprocessing as mp

        from tests.toy import free_port

        mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path), world), nprocs=2, join=True)
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    else:
        from tests.test_index_processes import run_in_threads

        monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 3)
        threads, ranks, _ = run_in_threads(2, lambda g: _build_with_auto(g, loaded, world.videos, str(tmp_path)))
        for t in threads:
            t.join(120)
    assert [r["compiles"] for r in ranks] == [[0], [1]], ranks
    assert ranks[0]["lines"] == ["--compile auto: compiling the video encoder (4 ranges to encode in the largest of 2 "
                                 "shares >= 3; nothing of this shape in the compile cache: the measured gain covers "
                                 "the compilation)"] and ranks[1]["lines"] == [], ranks
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["kernels"]["compiled"] is True
    assert len(rows(tmp_path / "idx")) == NUM_VIDEOS


AUTO_RUN_PATCH = ("import runtime.compilation as compilation\n"
                  "compilation.INDEX_AUTO_MIN_RANGES = compilation.INDEX_AUTO_MIN_RANGES_WARM = 1\n")


@pytest.mark.slow
def test_an_auto_compiled_index_equals_the_eager_one_to_rounding(world, tmp_path):
    """A real torch.compile of the video encoder chosen by --compile auto (threshold 1 range), 6 videos in
    batches of 4 (the last padded): one graph compiled, and the index's entries and features equal those of
    an eager run to float tolerance."""
    from tests.search_fixtures import SEARCH_VIDEOS_SCRIPT
    from tests.test_index_processes import run_processes

    script = tmp_path / "run_index.py"
    script.write_text(SEARCH_VIDEOS_SCRIPT.replace("import retrieval.index as index_module",
                                                   AUTO_RUN_PATCH + "import retrieval.index as index_module", 1))
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    eager = run_processes(str(script), world, tmp_path / "eager", 1, "--batch_size", "4", env=env)
    assert eager.returncode == 0, eager.stderr[-3000:]
    done = run_processes(str(script), world, tmp_path / "auto", 1, "--batch_size", "4", "--compile", "auto", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--compile auto: compiling the video encoder" in done.stderr
    compiles = [line for line in done.stderr.splitlines() if line.startswith("torch.compile: video encoder")]
    assert len(compiles) == 1 and "batch 4x" in compiles[0], done.stderr[-3000:]
    assert json.loads((tmp_path / "auto" / "index.json").read_text())["kernels"]["compiled"] is True
    compiled, reference = rows(tmp_path / "auto"), rows(tmp_path / "eager")
    assert len(compiled) == NUM_VIDEOS and [e for e, _ in compiled] == [e for e, _ in reference]
    for (_, a), (_, b) in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
