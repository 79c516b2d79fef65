"""The order metric at every evaluation, the 'group' / 'order_twin' columns of custom tables, group-aware
batches (--batch_groups) and their bad inputs."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders import build_test_dataset, build_train_dataset
from dataloaders.base import AnnotationError
from dataloaders.groups import GroupBatchSampler
from modules.order import order_metrics
from training.evaluation import evaluate
from runtime.precision import Precision
from tests.test_custom_data import main_py, media, write_rows  # noqa: F401  (media: a fixture)
from tests.toy import ToyData, tiny_dgl


class _Scaled:
    """A stand-in for the model in order_metrics: only the logit scale is read."""

    class clip:  # noqa: N801
        logit_scale = torch.tensor(0.0)


# ------------------------------------------------------------------------------------------ the metric
def test_order_metric_on_hand_built_features():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    video = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.0]])
    reversed_ = torch.tensor([[0.5, 1.0], [0.2, 1.0], [0.0, 1.0]])  # video 1 unchanged: a tie
    cap_idx = torch.tensor([0, 1, 2, 2])
    # caption 0: wins; caption 1: tie; caption 2 ([1,1] against [1,0] and [0,1]): tie; caption 3: wins
    r = order_metrics(_Scaled, text, video, reversed_, cap_idx)["reversed_video"]
    assert r == {"percent": 75.0, "ties": 2, "count": 4}
    twins = torch.tensor([[0.0, 1.0], [float("nan")] * 2, [1.0, 1.0], [1.0, 0.0]])
    s = order_metrics(_Scaled, text, video, reversed_, cap_idx, twins)["swapped_caption"]
    # caption 0 beats its twin on video 0; caption 1 has none; 2 and 3 equal their twins
    assert s == {"percent": pytest.approx(100 * 2 / 3), "ties": 2, "count": 3}


@pytest.mark.parametrize("latent,blind", [("linear", True), ("transformer", False)])
def test_reversed_video_metric_is_exactly_one_half_for_a_model_blind_to_order(latent, blind):
    """DGL-Linear's video feature does not change when the frames are reversed (the same prompts for every
    frame): every caption is a tie. The transformer latent space gives each frame its own prompts."""
    data = ToyData(num_videos=6, frames=4)
    model = tiny_dgl(seed=2, shared_latent_space=latent, max_frames=4)
    res = evaluate(model, data, batch_size=4, workers=0, device=torch.device("cpu"),
                   precision=Precision("fp32", torch.device("cpu")), progress=False, order_metric=True)
    r = res["order"]["reversed_video"]
    assert r["count"] == 6
    if blind:
        assert r["percent"] == 50.0 and r["ties"] == 6
    else:
        assert r["ties"] == 0
    assert "order" not in evaluate(model, data, batch_size=4, workers=0, device=torch.device("cpu"),
                                   precision=Precision("fp32", torch.device("cpu")), progress=False)


def test_results_json_and_log_carry_the_order_metric(tmp_path):
    from tests.toy import FIXED_KERNELS, run_toy

    run_toy(str(tmp_path / "run"), epochs=1, batch_size=8, data_kwargs={"num_videos": 8}, **FIXED_KERNELS)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for entry in results["evaluations"]:
        assert entry["order"]["reversed_video"]["count"] == 8
        assert entry["order"]["reversed_video"]["percent"] == 50.0  # the toy model is DGL-Linear on 2 frames
    assert "Order: reversed video 50.0% (8 ties of 8 captions)" in (tmp_path / "run" / "log.txt").read_text()
    run_toy(str(tmp_path / "off"), epochs=1, batch_size=8, data_kwargs={"num_videos": 8}, order_metric=0,
            **FIXED_KERNELS)
    assert "order" not in json.loads((tmp_path / "off" / "results.json").read_text())["evaluations"][0]


# ------------------------------------------------------------------------------------------ the columns
GROUPED = [  # video, caption, group, order_twin
    ("a.mp4", "a yellow screen", "g1", ""),
    ("a.mp4", "yellow all the time", "g1", ""),
    ("b.mp4", "a cyan screen", "g2", "a screen of cyan"),
]
HEADER = ("video", "caption", "group", "order_twin")


def _args(media, train=None, test=None, **extra):
    return Namespace(datatype="custom", val_csv=test, train_csv=train, features_path=str(media), max_frames=4,
                     max_words=16, image_resolution=32, **extra)


def test_group_and_order_twin_columns_are_read(media, tmp_path):
    ann = write_rows(tmp_path / "t.csv", GROUPED, HEADER)
    test = build_test_dataset(_args(media, test=ann), None)
    assert test.order_twins == [None, None, "a screen of cyan"]
    train = build_train_dataset(_args(media, train=ann, expand_msrvtt_sentences=True), None)
    assert train.item_groups() == ["g1", "g1", "g2"]
    per_video = build_train_dataset(_args(media, train=ann), None)
    assert per_video.item_groups() == ["g1", "g2"]
    test.leave_out_videos(iter([0]))  # a video left out (--skip_bad_videos): its rows go with it
    assert test.order_twins == ["a screen of cyan"] and test.captions == ["a cyan screen"]
    jsonl = write_rows(tmp_path / "t.jsonl", GROUPED, HEADER)
    assert build_train_dataset(_args(media, train=jsonl, expand_msrvtt_sentences=True), None).item_groups() == \
        ["g1", "g1", "g2"]


@pytest.mark.parametrize("rows,header,message", [
    ([("a.mp4", "x", "g1"), ("b.mp4", "y", "")], ("video", "caption", "group"),
     "t.csv line 3 column 'group': empty value"),
    ([("a.mp4", "x"), ("b.mp4", "y")], ("video", "caption"), "--batch_groups needs a 'group' column in --train_csv"),
])
def test_bad_group_columns(media, tmp_path, rows, header, message):
    ann = write_rows(tmp_path / "t.csv", rows, header)
    train = build_train_dataset(_args(media, train=ann, expand_msrvtt_sentences=True), None)
    with pytest.raises(AnnotationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.item_groups()


# ------------------------------------------------------------------------------------------ the sampler
class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _groups():
    """40 items in groups of 1 to 4 (sizes cycle), named by their first item."""
    groups, i, size = [], 0, 1
    while i < 40:
        groups += [f"g{i}"] * min(size, 40 - i)
        i += size
        size = size % 4 + 1
    return groups


@pytest.mark.parametrize("world", [1, 2])
def test_groups_stay_in_one_global_batch(world):
    groups = _groups()
    micro = 6 // world if world == 2 else 6
    per_rank = []
    for rank in range(world):
        sampler = GroupBatchSampler(groups, micro, world, rank, seed=3)
        sampler.set_epoch(1)
        per_rank.append(list(DataLoader(_Items(40), batch_size=micro, sampler=sampler, drop_last=True)))
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) >= 5  # most of the 40 items are used
    seen_groups = set()
    for step in range(len(per_rank[0])):
        global_batch = torch.cat([per_rank[r][step] for r in range(world)]).tolist()
        assert len(global_batch) == 6 and len(set(global_batch)) == 6
        batch_groups = {groups[i] for i in global_batch}
        for g in batch_groups:  # every item of a group that appears is in this batch
            assert {i for i, name in enumerate(groups) if name == g} <= set(global_batch)
            assert g not in seen_groups
            seen_groups.add(g)
    if world == 2:  # the two processes' items differ
        assert not set(torch.cat(per_rank[0]).tolist()) & set(torch.cat(per_rank[1]).tolist())


def test_the_batches_depend_on_the_seed_and_epoch_only():
    groups = _groups()
    a, b = GroupBatchSampler(groups, 6, seed=3), GroupBatchSampler(groups, 6, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_a_group_larger_than_the_global_batch_is_refused():
    with pytest.raises(ValueError, match="group 'big' has 5 rows, more than the global batch of 4"):
        GroupBatchSampler(["a", "big", "big", "big", "big", "big"], 2, world=2)


# ------------------------------------------------------------------------------------------ main.py
def _main_common(media, tmp_path):
    from preprocess.make_tiny_clip import write_tiny_clip

    clip = write_tiny_clip([r[1] for r in GROUPED], str(tmp_path / "clip"), num_merges=20)
    return ["--datatype", "custom", "--features_path", media, "--pretrained_dir", tmp_path / "clip",
            "--pretrained_clip_name", "tiny-clip.pt", "--bpe_path", clip["bpe"], "--max_words", "16",
            "--unified_transformer_layers", "2", "--device", "cpu", "--cpu_tuning", "0", "--epochs", "1",
            "--expand_msrvtt_sentences", "--no_tensorboard"]


@pytest.mark.parametrize("case", ["empty group", "no group column", "group too large", "one frame"])
def test_main_py_bad_order_inputs_one_line_nothing_written(media, tmp_path, case):
    common = _main_common(media, tmp_path)
    rows, header, flags = GROUPED, HEADER, ["--batch_groups", "--batch_size", "4", "--max_frames", "4"]
    if case == "empty group":
        rows = [GROUPED[0], GROUPED[1], ("b.mp4", "a cyan screen", "", "")]
        expect = "column 'group': empty value"
    elif case == "no group column":
        rows, header = [r[:2] for r in GROUPED], HEADER[:2]
        expect = "--batch_groups needs a 'group' column in --train_csv"
    elif case == "group too large":
        flags = ["--batch_groups", "--batch_size", "1", "--max_frames", "4"]
        expect = "group 'g1' has 2 rows, more than the global batch of 1"
    else:
        flags = ["--order_negatives", "reverse", "--max_frames", "1", "--batch_size", "2"]
        expect = "--order_negatives reverse needs at least 2 frames per video"
    ann = write_rows(tmp_path / "train.csv", rows, header)
    out = tmp_path / "out"
    proc = main_py([*common, "--train_csv", ann, "--val_csv", ann, "--output_dir", out, *flags], tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("main.py: error: ") and expect in last, proc.stderr[-2000:]
    assert not any((out / name).exists() for name in ("results.json", "ckpt.pth.tar", "config.json"))


def test_main_py_reports_both_order_metrics_and_the_analysis_tool_recomputes_them(media, tmp_path, capsys):
    """A custom test table with an order_twin column: main.py writes both metrics to results.json and the log;
    python -m analysis.order_metrics computes the same from the saved run."""
    from analysis.order_metrics import main as order_main

    common = _main_common(media, tmp_path)
    rows = GROUPED + [("long/c.mp4", "red then green then blue", "g3", "blue then green then red")]
    ann = write_rows(tmp_path / "t.csv", rows, HEADER)  # c.mp4 changes over time: reversed, it differs
    out = tmp_path / "run"
    proc = main_py([*common, "--train_csv", ann, "--val_csv", ann, "--output_dir", out, "--batch_size", "2",
                    "--max_frames", "4", "--shared_latent_space", "transformer", "--order_negatives", "reverse",
                    "--batch_groups", "--num_thread_reader", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads((out / "results.json").read_text())["evaluations"][-1]["order"]
    assert last["reversed_video"]["count"] == 4 and last["swapped_caption"]["count"] == 2
    assert last["reversed_video"]["ties"] == 3  # the solid-colour clips are the same reversed; c.mp4 is not
    log = (out / "log.txt").read_text()
    assert "Order: reversed video" in log and "swapped caption" in log and "--batch_groups: 3 groups" in log
    assert order_main([str(out), "--checkpoint", str(out / "ckpt.pth.tar"), "--json", str(tmp_path / "o.json")]) == 0
    again = json.loads((tmp_path / "o.json").read_text())
    for key in ("reversed_video", "swapped_caption"):
        assert again[key]["count"] == last[key]["count"] and again[key]["ties"] == last[key]["ties"]
        assert again[key]["percent"] == pytest.approx(last[key]["percent"])
    assert "order: reversed video" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        order_main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "config.json not found" in capsys.readouterr().err


def test_custom_sh_passes_the_order_options_to_main_py(tmp_path):
    """scripts/custom.sh hands extra flags to main.py (later flags win): main.py's own check of
    --order_negatives against --max_frames 1 answers, before any weights are read."""
    import os
    import subprocess

    from tests.test_custom_data import REPO

    (tmp_path / "videos").mkdir()
    write_rows(tmp_path / "train.csv", GROUPED, HEADER)
    write_rows(tmp_path / "test.csv", GROUPED, HEADER)
    (tmp_path / "ViT-B-32.pt").write_bytes(b"")
    env = dict(os.environ, DATA_PATH=str(tmp_path), VIDEO_PATH=str(tmp_path / "videos"), PRETRAINED_DIR=str(tmp_path),
               OUTPUT_DIR=str(tmp_path / "out"), NUM_GPUS="1")
    r = subprocess.run(["bash", str(REPO / "scripts" / "custom.sh"), "--order_negatives", "shuffle", "--batch_groups",
                        "--max_frames", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("main.py: error: --order_negatives shuffle needs at least 2 frames per "
                                                 "video to reorder; --max_frames is 1 (see --help)")
