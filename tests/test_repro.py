"""The reproducibility record, the per-query ranks files and the run comparison command."""
import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modules.metrics import metrics_from_ranks
from training.repro import annotation_files, hash_annotation_files

REPO = Path(__file__).resolve().parents[1]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_annotation_files_and_hashes_of_the_real_files(annotations_dir):
    msrvtt = annotations_dir / "msrvtt"
    args = argparse.Namespace(datatype="msrvtt", train_csv=str(msrvtt / "MSRVTT_train.9k.csv"),
                              val_csv=str(msrvtt / "MSRVTT_JSFUSION_test.csv"), data_path=str(msrvtt))
    files = annotation_files(args, {"train", "test"})
    assert files == [str(msrvtt / "MSRVTT_train.9k.csv"), str(msrvtt / "MSRVTT_data.json"),
                     str(msrvtt / "MSRVTT_JSFUSION_test.csv")]
    assert annotation_files(args, {"test"}) == [str(msrvtt / "MSRVTT_JSFUSION_test.csv")]
    hashed = hash_annotation_files(files)
    for entry, path in zip(hashed, files):
        if Path(path).is_file():
            assert entry["sha256"] == _sha256(path) and entry["bytes"] == Path(path).stat().st_size
        else:  # MSRVTT_data.json is not in the shared folder: recorded as unreadable, not skipped
            assert entry["sha256"] is None and "FileNotFoundError" in entry["error"]

    act = annotations_dir / "activitynet"
    args = argparse.Namespace(datatype="activity", data_path=str(act))
    files = annotation_files(args, {"train", "test"})
    assert files == [str(act / n) for n in ("train_ids.json", "train.json", "val_ids.json", "val_1.json")]
    assert [e["sha256"] for e in hash_annotation_files(files)] == [_sha256(f) for f in files]

    lsmdc = annotations_dir / "lsmdc"
    args = argparse.Namespace(datatype="lsmdc", data_path=str(lsmdc))
    assert annotation_files(args, {"test"}) == [str(lsmdc / "LSMDC16_challenge_1000_publictect.csv")]
    msvd = annotations_dir / "msvd"
    args = argparse.Namespace(datatype="msvd", data_path=str(msvd))
    assert annotation_files(args, {"test"})[0] == str(msvd / "test_list.txt")


@pytest.fixture(scope="module")
def two_toy_runs(tmp_path_factory):
    """Two multi-sentence toy runs that differ in their training (seed), evaluated with --dsl."""
    from tests.toy import FIXED_KERNELS, run_toy

    root = tmp_path_factory.mktemp("runs")
    data = dict(num_videos=8, captions_per_video=2)
    for name, seed in (("a", 0), ("b", 1)):
        run_toy(str(root / name), data_kwargs=data, epochs=1, dsl=True, no_tensorboard=True, seed=seed,
                do_train=1, do_eval=1, **FIXED_KERNELS)
    return root / "a", root / "b"


def test_run_writes_reproducibility_record(two_toy_runs):
    run_a, _ = two_toy_runs
    rec = json.loads((run_a / "reproducibility.json").read_text())
    import torch
    assert rec["software"]["packages"]["torch"] == torch.__version__
    assert rec["software"]["torch_cuda"] == torch.version.cuda
    assert "decord" in rec["software"]["packages"] and "av" in rec["software"]["packages"]
    assert rec["world_size"] == 1 and len(rec["devices"]) == 1 and rec["devices"][0]["type"] == "cpu"
    assert rec["batch"] == {"per_process": 4, "gradient_accumulation_steps": 1, "micro_batch": 4, "global": 4,
                            "eval_per_process": 8}
    assert rec["precision"]["flag"] == "fp32" and rec["precision"]["autocast_dtype"] is None
    assert rec["seed"] == 0
    assert rec["input"]["image_resolution"] == 32 and rec["input"]["max_frames"] == 2
    assert "resize_short_side" in rec["input"] and "video_decoder" in rec["input"]
    # the toy run names a --train_csv that does not exist: listed, with the reason it has no hash
    assert rec["annotation_files"][0]["path"].endswith("toy") and rec["annotation_files"][0]["sha256"] is None


def test_every_evaluation_writes_per_query_ranks(two_toy_runs):
    run_a, _ = two_toy_runs
    results = json.loads((run_a / "results.json").read_text())
    assert [e["ranks_file"] for e in results["evaluations"]] == ["ranks_eval0.json", "ranks_epoch1.json"]
    for entry in results["evaluations"]:
        ranks = json.loads((run_a / entry["ranks_file"]).read_text())
        assert ranks["num_captions"] == 16 and ranks["num_videos"] == 8 and ranks["multi_sentence"]
        assert ranks["t2v"]["video"] == np.repeat(np.arange(8), 2).tolist()
        # the stored ranks give exactly the logged metrics, plain and DSL (1-based ranks)
        assert metrics_from_ranks(np.array(ranks["t2v"]["rank"]) - 1) == entry["t2v"]
        assert metrics_from_ranks(np.array(ranks["v2t"]["rank"]) - 1) == entry["v2t"]
        assert metrics_from_ranks(np.array(ranks["dsl"]["t2v"]["rank"]) - 1) == entry["dsl"]["t2v"]
        assert metrics_from_ranks(np.array(ranks["dsl"]["v2t"]["rank"]) - 1) == entry["dsl"]["v2t"]
        # a caption whose ground truth is ranked first has it as its top-1 video
        for r, gt, top in zip(ranks["t2v"]["rank"], ranks["t2v"]["video"], ranks["t2v"]["top1"]):
            assert (r == 1) == (gt == top)
    log = (run_a / "log.txt").read_text()
    assert "DSL Text-to-Video" in log and "every test query at once" in log


def test_compare_runs_counts(two_toy_runs):
    from analysis.compare_runs import compare
    from analysis.query_ranks import load_query_ranks

    run_a, run_b = two_toy_runs
    a, b = load_query_ranks(str(run_a)), load_query_ranks(str(run_b))
    assert a["path"].endswith("ranks_epoch1.json")  # the last evaluation of the run
    diff = compare(a, b, top=5)
    for direction in ("t2v", "v2t"):
        d = diff[direction]
        ra, rb = np.array(a[direction]["rank"]), np.array(b[direction]["rank"])
        assert d["same_rank"] + d["better_in_b"] + d["worse_in_b"] == d["num_queries"] == ra.size
        assert d["better_in_b"] == int(np.sum(rb < ra)) and d["worse_in_b"] == int(np.sum(rb > ra))
        # R@1 gained minus lost is the change of R@1
        net = 100.0 * (d["r1_gained"] - d["r1_lost"]) / ra.size
        assert net == pytest.approx(d["metrics_b"]["R1"] - d["metrics_a"]["R1"])
        for q in d["most_changed"]:
            assert q["rank_a"] == ra[q["query"]] and q["rank_b"] == rb[q["query"]] and q["rank_a"] != q["rank_b"]
    assert diff["t2v"]["top1_changed"] == int(np.sum(np.array(a["t2v"]["top1"]) != np.array(b["t2v"]["top1"])))
    # the run against itself: nothing differs
    same = compare(a, a)
    assert same["t2v"]["same_rank"] == 16 and same["t2v"]["most_changed"] == [] and same["t2v"]["top1_changed"] == 0


def test_compare_runs_cli(two_toy_runs, tmp_path, capsys):
    run_a, run_b = two_toy_runs
    cmd = [sys.executable, "-m", "analysis.compare_runs"]
    r = subprocess.run(cmd + [str(run_a), str(run_b), "--json", str(tmp_path / "d.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Text-to-video (one query per caption): 16 queries" in r.stdout and "R@1:" in r.stdout
    assert json.loads((tmp_path / "d.json").read_text())["t2v"]["num_queries"] == 16
    from analysis.compare_runs import main as compare_runs  # the same program in this process: --dsl's output

    code = compare_runs([str(run_a), str(run_b), "--dsl", "--json", str(tmp_path / "dsl.json")])
    assert code == 0 and "(DSL ranks)" in capsys.readouterr().out
    # --dsl compares the DSL ranks, which are not the plain ones here
    from analysis.query_ranks import load_query_ranks

    a, b = load_query_ranks(str(run_a)), load_query_ranks(str(run_b))
    d = json.loads((tmp_path / "dsl.json").read_text())
    assert d["dsl"] is True
    assert any(a["dsl"][k]["rank"] != a[k]["rank"] or b["dsl"][k]["rank"] != b[k]["rank"] for k in ("t2v", "v2t"))
    for direction in ("t2v", "v2t"):
        ra, rb = np.array(a["dsl"][direction]["rank"]), np.array(b["dsl"][direction]["rank"])
        assert d[direction]["metrics_a"] == metrics_from_ranks(ra - 1)
        assert d[direction]["metrics_b"] == metrics_from_ranks(rb - 1)
        assert (d[direction]["better_in_b"], d[direction]["worse_in_b"]) == (int(np.sum(rb < ra)), int(np.sum(rb > ra)))
        assert d[direction]["r1_gained"] == int(np.sum((rb == 1) & (ra != 1)))
    # a different test set is refused with one line
    other = json.loads((run_b / "ranks_epoch1.json").read_text())
    other["t2v"]["video"] = other["t2v"]["video"][::-1]
    (tmp_path / "ranks_x.json").write_text(json.dumps(other))
    bad = subprocess.run(cmd + [str(run_a), str(tmp_path / "ranks_x.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "differently" in bad.stderr


@pytest.mark.parametrize("version", ["2.13.0+cu130", "2.13.0+cpu", "2.13.0"])
def test_record_keeps_the_exact_torch_build(monkeypatch, version):
    """The record names the installed build with its tag, whichever build this machine has."""
    import torch

    from training import repro

    monkeypatch.setattr(torch, "__version__", version)
    assert repro.package_versions()["torch"] == version
    args = argparse.Namespace(batch_size=4, datatype="msrvtt")
    assert repro.build_record(args, 1, torch.device("cpu"))["software"]["packages"]["torch"] == version


def test_cuda_device_description(monkeypatch):
    import types

    import torch

    from training.repro import device_description

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    d = device_description(torch.device("cuda", 1))
    assert d == {"type": "cuda", "index": 1, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                 "memory_gib": 80.0}
