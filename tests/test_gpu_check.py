"""The GPU check's CPU smoke mode: every section runs and the JSON holds finite measurements."""
import json
import math

import pytest

from benchmarks import gpu_check


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_tiny_cpu_check_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    returned = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--precisions", "fp32",
                               "--eval_precisions", "fp32", "--stability_steps", "2", "--iters", "1",
                               "--max_batch_precision", "fp32", "--sections", "train,eval,stability,max_batch",
                               "--time_budget_s", "10000", "--max_batch_time_s", "10000"])
    data = json.loads(out.read_text())
    assert data["finished"] and data["skipped"] == []
    assert data["environment"]["torch"] and data["environment"]["options"]["tiny"] is True

    train = {(r["precision"], r["impl"]): r for r in data["train"]}
    assert set(train) == {("fp32", "ours"), ("fp32", "published")}
    for r in train.values():
        assert r["status"] == "ok", r
        assert r["batch"] == 4 and _finite(r["step_s"]) and r["step_s"] > 0 and _finite(r["loss"])
        assert r["videos_per_s"] == pytest.approx(4 / r["step_s"])
    for row in data["comparisons"]:
        speedup = train[(row["precision"], "published")]["step_s"] / train[(row["precision"], "ours")]["step_s"]
        assert row["speedup"] == pytest.approx(speedup)
        assert row["speed_target_met"] == (row["speedup"] >= gpu_check.SPEED_TARGET)
    assert [r["precision"] for r in data["comparisons"]] == ["fp32"]

    assert {(r["precision"], r["impl"]) for r in data["eval"]} == {("fp32", "ours"), ("fp32", "published")}
    assert all(r["status"] == "ok" and _finite(r["videos_per_s"]) and _finite(r["texts_per_s"]) for r in data["eval"])

    stability = data["stability"]  # AMP as main.py runs it: on CPU bf16 autocast, no GradScaler
    assert stability["status"] == "ok" and stability["steps"] == 2 and stability["params_finite"]
    assert _finite(stability["last_loss"]) and stability["passed"]

    assert {m["impl"] for m in data["max_batch"]} == {"ours", "published"}
    for m in data["max_batch"]:  # doubling from the batch of 4 that fitted, up to the tiny limit of 8
        assert [t["batch"] for t in m["tries"]] == [8] and m["largest_fitting_batch"] == 8
    assert returned["train"] == data["train"]


def test_out_of_memory_is_recorded_and_the_check_goes_on():
    def fails():
        raise gpu_check.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    assert gpu_check.guarded(fails) == {"status": "oom",
                                        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert gpu_check.guarded(lambda: 1 / 0)["status"] == "error"
    assert gpu_check.guarded(lambda: {"x": 1.0}) == {"status": "ok", "x": 1.0}


def test_time_budget_skips_what_is_left(tmp_path):
    out = tmp_path / "check.json"
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--time_budget_s", "0"])
    data = json.loads(out.read_text())
    assert data["finished"] and data["train"] == [] and data["distributed"] is None
    assert data["skipped"] == ["distributed", "everything for tiny"]


@pytest.mark.slow
def test_one_process_torchrun_passes_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--sections", "distributed"])
    distributed = json.loads(out.read_text())["distributed"]
    assert distributed["backend"] == "gloo" and distributed["passed"], distributed
    assert distributed["checks"] and all(distributed["checks"].values())
