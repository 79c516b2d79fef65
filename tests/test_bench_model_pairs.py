"""The model benchmark's paired rounds: PyTorch's defaults and a tuned setup timed alternately in one process,
judged by each round's own two times (benchmarks/bench_model.py). A fake clock replaces the timer: each call
advances it by its configured time, so nothing here depends on the machine's speed."""
from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import bench_model
from modules.clip import CLIP, tiny_clip_config
from modules.dgl import DGL, DGLConfig


class FakeClock:
    """A clock that only moves when a timed call runs; keeps the order of the calls."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def step(self, name: str, seconds_per_call: list):
        """A callable that takes ``seconds_per_call[k]`` on its k-th call."""
        count = {"n": 0}

        def run():
            self.now += seconds_per_call[count["n"]]
            count["n"] += 1
            self.calls.append(name)
        return run


def test_the_order_alternates_round_by_round():
    clock = FakeClock()
    default = clock.step("default", [1.0] * 5)
    tuned = clock.step("tuned", [1.0] * 5)
    bench_model.paired_rounds(default, tuned, 5, clock=clock)
    rounds = [tuple(clock.calls[i:i + 2]) for i in range(0, 10, 2)]
    assert rounds == [("default", "tuned"), ("tuned", "default")] * 2 + [("default", "tuned")]


def test_each_ratio_comes_from_its_own_round_under_changing_load():
    # the load changes from round to round (x1, x3, x1.5, x6): a ratio across rounds would show it
    load = [1.0, 3.0, 1.5, 6.0]
    clock = FakeClock()
    default = clock.step("default", [1.0 * f for f in load])
    tuned = clock.step("tuned", [1.05 * f for f in load])
    pairs = bench_model.paired_rounds(default, tuned, 4, clock=clock)
    assert pairs == [pytest.approx((1.0 * f, 1.05 * f)) for f in load]
    ratios = bench_model.round_ratios(pairs)
    assert ratios == pytest.approx([1.05] * 4)
    summary = bench_model.ratio_summary(ratios)
    assert summary["median"] == pytest.approx(1.05) and summary["median"] > bench_model.SLOWER_ALLOWED


def test_a_faster_setup_shows_a_ratio_below_one():
    clock = FakeClock()
    pairs = bench_model.paired_rounds(clock.step("default", [2.0, 4.0]), clock.step("tuned", [1.8, 3.6]), 2,
                                      clock=clock)
    assert bench_model.round_ratios(pairs) == pytest.approx([0.9, 0.9])


def test_median_and_range_of_the_ratios():
    summary = bench_model.ratio_summary([1.10, 0.95, 1.01, 0.99, 1.30])
    assert summary == {"median": 1.01, "min": 0.95, "max": 1.30, "rounds": 5}
    assert bench_model.ratio_summary([1.0, 1.2])["median"] == pytest.approx(1.1)


def test_processes_are_pooled_and_their_choices_counted():
    default_kernels = {"fp32_products": "mkl", "attention": "PyTorch's choice"}
    onednn = {"fp32_products": "onednn", "attention": "PyTorch's choice"}
    entries = [{"pairs": [(1.0, 1.02), (2.0, 1.9)], "kernels": default_kernels, "second_model": False},
               {"pairs": [(1.0, 1.1), (1.0, 1.0)], "kernels": onednn, "second_model": False}]
    summary = bench_model.pooled_pairs(entries)
    assert summary["rounds"] == 4 and summary["processes"] == 2 and summary["chose_defaults"] == 1
    assert summary["median"] == pytest.approx((1.0 + 1.02) / 2)
    assert (summary["min"], summary["max"]) == pytest.approx((0.95, 1.1))
    line = bench_model.describe_pairs("tuned", summary)
    assert "1.010x (ok" in line and "0.950-1.100" in line and "default kernels in 1 of 2 processes" in line
    slower = bench_model.describe_pairs("api", bench_model.pooled_pairs(
        [{"pairs": [(1.0, 1.1)] * 2, "kernels": default_kernels, "second_model": True}]))
    assert "1.100x (SLOWER" in slower and "chose PyTorch's default kernels" in slower and "second model" in slower


class _Tuning:
    """What run_worker uses of modules.backends.tune's result, choosing oneDNN fp32 products; ``store``: the
    frozen backbone stored in bf16 (as tune does for bf16), a change of the model itself."""

    def __init__(self, model, store: bool):
        self.undo: list = []
        if store:
            bench_model.cpu.store_backbone_in_bf16(model, self.undo)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # the process-wide path a oneDNN choice leaves

    def inference(self):
        return bench_model.cpu.compute_context("cpu", None, None, "onednn")

    autocast = inference

    def record(self):
        return {"eval": {"fp32_products": "onednn", "attention": "PyTorch's choice", "source": "measured",
                         "seconds": {}}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_defaults_run_untuned_beside_the_tuned_setup(monkeypatch, precision):
    """The paired default calls run outside the tuning's settings (the fp32 product path the process had
    before it) and, where the tuning changed the model (bf16 storage), on a second model with fp32 weights."""
    matmul = torch.backends.mkldnn.matmul
    untuned_setting = matmul.fp32_precision
    tunings = []

    def fake_tune(model, device, precision_name, batch, uses):
        tunings.append((model, _Tuning(model, store=precision_name == "bf16")))
        return tunings[-1][1]
    calls = []

    def fake_step(args, model, mode, encode_video=None):  # records what each call computes with, computes nothing
        def run():
            module, name = bench_model.cpu.autocast_cast_tensors(model.clip)[0]  # a frozen backbone matrix
            calls.append((model, getattr(module, name).dtype, matmul.fp32_precision))
        return run
    monkeypatch.setattr(bench_model.cpu, "tune", fake_tune)
    monkeypatch.setattr(bench_model, "step_function", fake_step)

    def tiny_build(args):  # the benchmark's build at a test model's sizes: the same seed, the same weights
        torch.manual_seed(0)
        return DGL(CLIP(tiny_clip_config(vision_layers=1, transformer_layers=1)),
                   DGLConfig(max_frames=args.frames, max_words=32, unified_transformer_layers=1))
    monkeypatch.setattr(bench_model, "build", tiny_build)
    args = argparse.Namespace(layers=1, patch=16, resolution=32, frames=2, batch=1, latent="linear", device="cpu",
                              threads=torch.get_num_threads(), impl="ours", mode="eval", precision=precision,
                              setup="api", warmup=1, repeats=2, pair_rounds=3)
    try:
        result = bench_model.run_worker(args)
    finally:
        matmul.fp32_precision = untuned_setting  # the fake tuning set it for the process
    tuned_model = tunings[0][0]
    setup_calls = [c for c in calls if c[0] is tuned_model and c[2] == "bf16"]
    default_calls = [c for c in calls if c[2] == untuned_setting]
    assert len(setup_calls) == 1 + 1 + 2 + 3 and len(default_calls) == 1 + 3  # first, warm-up, repeats, rounds
    assert len(calls) == len(setup_calls) + len(default_calls)
    assert len(result["pairs"]) == 3 and result["kernels"]["fp32_products"] == "onednn"
    if precision == "bf16":
        assert result["second_model"] is True
        assert all(c[0] is not tuned_model and c[1] == torch.float32 for c in default_calls)
        assert all(c[1] == torch.bfloat16 for c in setup_calls)
    else:
        assert result["second_model"] is False
        assert all(c[0] is tuned_model and c[1] == torch.float32 for c in default_calls)
