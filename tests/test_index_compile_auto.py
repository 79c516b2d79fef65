"""`search_videos.py index --compile auto`: eager for a short run, compiled for a long one (the thresholds
patched; the compilation itself replaced by the plain encoder in the fast tests), one log line either way,
a warm compile cache counted, an index's recorded choice kept; and (slow) an auto-compiled index equal to
the eager one to float tolerance."""
from __future__ import annotations

import json

import pytest
import torch

from retrieval.segments import Segmentation, plan_ranges
from tests.search_fixtures import NUM_VIDEOS, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("auto_compile_world")))


def test_ranges_counted_before_planning():
    from retrieval.auto_compile import ranges_of_file

    assert ranges_of_file(Segmentation(mode="whole"), 500.0) == 1
    assert ranges_of_file(Segmentation(mode="auto", whole_up_to=60), 59.0) == 1
    assert ranges_of_file(Segmentation(mode="auto", whole_up_to=60), None) == 1
    windows = Segmentation(mode="windows", window=10, stride=5, scales=2)
    assert ranges_of_file(windows, 61.0) == len(plan_ranges(windows, "unused.mp4", 61.0))  # exact
    # shots: at most max_len seconds each, so at least ceil(duration / max_len) of them, and their runs
    assert ranges_of_file(Segmentation(mode="shots", max_len=30, scales=1), 95.0) == 4
    assert ranges_of_file(Segmentation(mode="shots", max_len=30, scales=2), 95.0) == 4 + 3
    assert ranges_of_file(Segmentation(mode="auto", whole_up_to=60, max_len=30, scales=1), 95.0) == 4


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
    assert "at least 5 ranges" in compilation.auto_compile_index(5, warm=True, estimated=True)[1]


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


def test_index_compile_auto_short_run_eager_long_run_compiled(world, tmp_path, capsys, monkeypatch):
    """Two runs of one video: eager under a threshold of 2 ranges, compiled under 1 (recorded in the index,
    and the compile cache folder then counts as warm for the shape)."""
    import os

    import modules.backends as backends
    import retrieval.encode as encode_module
    from modules.backends import Fp32Check
    from retrieval.auto_compile import index_shape_key
    from runtime import compilation
    from tests.search_fixtures import run_cli

    compiled = []
    monkeypatch.setattr(encode_module.torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    # no kernel timing: one candidate each (MKL, PyTorch's attention choice)
    monkeypatch.setattr(backends, "_cached_fp32_check",
                        lambda threads: Fp32Check(exact=False, error_mkl=0.0, error_onednn=0.0, speedup=0.0))
    monkeypatch.setattr(backends, "_cached_attention_times",
                        lambda shape, dtype, threads: {("flash", "eval"): 1.0, ("math", "eval"): 2.0})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
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
    assert not on and not compiled
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 1)
    line, on = index("long")
    assert line.startswith("--compile auto: compiling the video encoder (at least 1 ranges to encode >= 1; nothing "
                           "of this shape in the compile cache")
    assert on and len(compiled) == 1
    model = world.model().model
    assert compilation.is_warm(index_shape_key(model, torch.device("cpu"), 8, None))
    assert not compilation.is_warm(index_shape_key(model, torch.device("cpu"), 4, None))


def test_compile_auto_counts_a_warm_cache_the_processes_and_an_index_record(world, tmp_path, capsys, monkeypatch):
    import argparse

    from retrieval.auto_compile import index_shape_key
    from retrieval.cli import _compile_wanted
    from runtime import compilation

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES", 100)
    monkeypatch.setattr(compilation, "INDEX_AUTO_MIN_RANGES_WARM", NUM_VIDEOS // 2 + 1)
    model, cpu = world.model().model, torch.device("cpu")
    args = argparse.Namespace(compile="auto", videos=[world.videos], index=str(tmp_path / "idx"), batch_size=8,
                              precision="fp32", video_decoder=None)

    def wanted(recorded=None, processes=1):
        on = _compile_wanted(args, model, cpu, recorded, None, processes)
        return on, capsys.readouterr().err.strip()

    assert wanted() == (False, f"--compile auto: eager ({NUM_VIDEOS} ranges to encode < 100; nothing of this shape "
                               "in the compile cache: too short for compilation to pay)")
    compilation.mark_warm(index_shape_key(model, cpu, 8, None))
    on, line = wanted()
    assert on and line.startswith(f"--compile auto: compiling the video encoder (at least {NUM_VIDEOS} ranges to "
                                  f"encode >= {NUM_VIDEOS // 2 + 1}; the compile cache holds this shape")
    # two processes share the ranges: each encodes half, under the threshold
    assert wanted(processes=2) == (False, f"--compile auto: eager ({NUM_VIDEOS // 2} ranges to encode < "
                                          f"{NUM_VIDEOS // 2 + 1}; the compile cache holds this shape: too short "
                                          "for compilation to pay)")
    # an index that records a choice keeps it, however long or short the run
    assert wanted({"device": "cpu", "compiled": True}) == (
        True, "--compile auto: compiling the video encoder (as the index records: its entries were computed compiled)")
    assert wanted({"device": "cpu"})[0] is False


AUTO_RUN_PATCH = ("import runtime.compilation as compilation\n"
                  "compilation.INDEX_AUTO_MIN_RANGES = compilation.INDEX_AUTO_MIN_RANGES_WARM = 1\n")


@pytest.mark.slow
def test_an_auto_compiled_index_equals_the_eager_one_to_rounding(world, tmp_path):
    """A real torch.compile of the video encoder chosen by --compile auto (threshold 1 range): the index's
    entries and features equal those of an eager run to float tolerance."""
    from tests.test_index_processes import RUN, rows, run_processes

    script = tmp_path / "run_index.py"
    script.write_text(RUN.replace("import retrieval.index as index_module",
                                  AUTO_RUN_PATCH + "import retrieval.index as index_module", 1))
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    eager = run_processes(str(script), world, tmp_path / "eager", 1, env=env)
    assert eager.returncode == 0, eager.stderr[-3000:]
    done = run_processes(str(script), world, tmp_path / "auto", 1, "--compile", "auto", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--compile auto: compiling the video encoder" in done.stderr
    assert "torch.compile: video encoder, batch 2x" in done.stderr
    assert json.loads((tmp_path / "auto" / "index.json").read_text())["kernels"]["compiled"] is True
    compiled, reference = rows(tmp_path / "auto"), rows(tmp_path / "eager")
    assert len(compiled) == NUM_VIDEOS and [e for e, _ in compiled] == [e for e, _ in reference]
    for (_, a), (_, b) in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
