"""--datatype custom: the annotation formats, spans, multi-caption scoring, the video-disjoint split,
--init_checkpoint against --resume, and every bad input of the format (one line, exit status 2)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import build_test_dataset, build_train_dataset
from dataloaders.base import AnnotationError
from dataloaders.video import clip_frame_span, load_video
from preprocess.ffmpeg_tools import write_video
from preprocess.split_annotations import main as split_main, read_rows

REPO = Path(__file__).resolve().parents[1]
SCENE = 12  # frames per scene at 3 fps: 4 s
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230)]


def solid(colour, frames=SCENE):
    out = np.empty((frames, 32, 32, 3), np.uint8)
    out[:] = colour
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two short clips and one 12 s video of three solid-colour scenes (red, green, blue)."""
    root = tmp_path_factory.mktemp("custom_media")
    write_video(str(root / "a.mp4"), solid((200, 200, 0)), fps=3.0, crf=0)
    write_video(str(root / "b.mp4"), solid((0, 200, 200)), fps=3.0, crf=0)
    write_video(str(root / "long" / "c.mp4"), np.concatenate([solid(c) for c in COLOURS]), fps=3.0, crf=0)
    return root


ROWS = [  # video, caption, start, end
    ("a.mp4", "a yellow screen", "", ""),
    ("a.mp4", "yellow all the time", "", ""),
    ("b.mp4", "a cyan screen", "", ""),
    ("long/c.mp4", "red at first", "0", "4"),
    ("long/c.mp4", "then green", "4", "8"),
    ("long/c.mp4", "green in the middle", "4", "8"),
    ("long/c.mp4", "blue at the end", "8", "12"),
]


def write_rows(path: Path, rows=ROWS, header=("video", "caption", "start", "end")) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        lines = []
        for r in rows:
            item = {k: v for k, v in zip(header, r) if v != ""}
            lines.append(json.dumps(item))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        text = sep.join(header) + "\n" + "".join(sep.join(f'"{v}"' if sep in v else v for v in r) + "\n"
                                                 for r in rows)
        path.write_text(text, encoding="utf-8")
    return str(path)


def args_for(media, test_file, train_file=None, **extra):
    return Namespace(datatype="custom", val_csv=test_file, train_csv=train_file, features_path=str(media),
                     max_frames=4, max_words=16, image_resolution=32, **extra)


# ------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("ext", [".tsv", ".jsonl"])
def test_formats_read_the_same(media, tmp_path, ext):
    ref = build_test_dataset(args_for(media, write_rows(tmp_path / "ann.csv")), None)
    other = build_test_dataset(args_for(media, write_rows(tmp_path / f"ann{ext}")), None)
    assert [(v.video_id, v.path, v.start, v.end) for v in other.videos] == \
           [(v.video_id, v.path, v.start, v.end) for v in ref.videos]
    assert other.captions == ref.captions and other.caption_video_index.tolist() == ref.caption_video_index.tolist()
    # each video / span once; captions linked in file order
    assert ref.num_videos == 5 and ref.num_captions == 7
    assert ref.caption_video_index.tolist() == [0, 0, 1, 2, 3, 3, 4]
    assert [v.video_id for v in ref.videos] == ["a.mp4", "b.mp4", "long/c.mp4@0-4", "long/c.mp4@4-8",
                                                "long/c.mp4@8-12"]
    assert ref.videos[3].start == 4.0 and ref.videos[3].end == 8.0 and ref.videos[0].start is None
    assert ref.caption_sources[4] == "ann.csv line 6"


def test_video_id_column_groups_rows(media, tmp_path):
    rows = [("a.mp4", "one", "x"), ("a.mp4", "two", "x"), ("a.mp4", "three", "y")]
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "ids.csv", rows, ("video", "caption", "video_id"))),
                            None)
    assert [v.video_id for v in ds.videos] == ["x", "y"] and ds.caption_video_index.tolist() == [0, 0, 1]


def test_training_samples_per_caption_or_per_video(media, tmp_path):
    ann = write_rows(tmp_path / "train.csv")
    per_caption = build_train_dataset(args_for(media, None, ann, expand_msrvtt_sentences=True), None)
    per_video = build_train_dataset(args_for(media, None, ann, expand_msrvtt_sentences=False), None)
    assert len(per_caption) == 7 and not per_caption.sample_per_video
    assert len(per_video) == 5 and per_video.sample_per_video


# ------------------------------------------------------------------------------------ spans
def test_span_is_cut_with_the_published_frame_rule(media, tmp_path):
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "ann.csv")), None)
    path = str(media / "long" / "c.mp4")
    for v, colour in zip((2, 3, 4), COLOURS):
        entry = ds.videos[v]
        video, mask = ds.load_video(v, "test")
        direct = load_video(path, 4, 32, train=False, start=entry.start, end=entry.end)
        assert torch.equal(video, direct.video) and torch.equal(mask, direct.mask)
        first, count = clip_frame_span(3 * SCENE, 3.0, entry.start, entry.end)
        assert first == int(entry.start) * 3 and count == 3 * (int(entry.end) - int(entry.start)) + 1 - (v == 4)
        assert all(first <= i < first + count for i in direct.info.frame_indices)
        # the sampled frames are the scene's colour (no frame of a neighbouring scene)
        mean = torch.tensor(CLIP_MEAN_STD[0])[:, None, None]
        std = torch.tensor(CLIP_MEAN_STD[1])[:, None, None]
        pixels = (video * std + mean) * 255
        dominant = pixels.mean(dim=(2, 3)).argmax(dim=1)
        assert dominant.tolist() == [int(np.argmax(colour))] * 4


CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_span_past_the_end_is_an_error_or_clipped(media, tmp_path, capsys):
    from training.data_checks import check_spans

    rows = ROWS[:3] + [("long/c.mp4", "past the end", "8", "20")]
    ann = write_rows(tmp_path / "past.csv", rows)
    ds = build_test_dataset(args_for(media, ann), None)
    with pytest.raises(SystemExit) as exc:
        check_spans(ds, "test", skip=False, clip_to_video=False)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "past.csv line 5 column 'end'" in err and "c.mp4" in err and "--clip_spans_to_video" in err
    check_spans(ds, "test", skip=False, clip_to_video=True)
    assert ds.videos[2].end == pytest.approx(12.0)
    video, _ = ds.load_video(2, "test")  # now readable: the last scene
    assert video.shape == (4, 3, 32, 32)
    rows = ROWS[:3] + [("long/c.mp4", "after the end", "13", "20")]
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "after.csv", rows)), None)
    with pytest.raises(SystemExit):
        check_spans(ds, "test", skip=False, clip_to_video=True)  # nothing of the span is in the video
    assert "after.csv line 5 column 'start'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ scoring
def direct_ranks(sim: np.ndarray, caption_video: list[int], num_videos: int):
    """1-based ranks by plain loops: text->video over all videos; video->text over videos scored by the
    best caption of each; ties go to the lower index first."""
    t2v = []
    for c, gt in enumerate(caption_video):
        better = sum(1 for v in range(num_videos) if sim[c, v] > sim[c, gt] or (sim[c, v] == sim[c, gt] and v < gt))
        t2v.append(better + 1)
    v2t = []
    for v in range(num_videos):
        score = [max(sim[c, v] for c in range(len(caption_video)) if caption_video[c] == u) for u in range(num_videos)]
        better = sum(1 for u in range(num_videos) if score[u] > score[v] or (score[u] == score[v] and u < v))
        v2t.append(better + 1)
    return np.array(t2v), np.array(v2t)


def test_multi_caption_scoring_against_a_direct_computation(media, tmp_path):
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from tests.toy import evaluate_moved_tiny_dgl

    bpe = write_bpe_vocab([r[1] for r in ROWS], tmp_path / "bpe.txt.gz", num_merges=40)
    tok = get_tokenizer(bpe_path=bpe)
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "ann.csv")), tok)
    res = evaluate_moved_tiny_dgl(ds, tok.vocab_size)
    assert res["multi_sentence"] and res["sim"].shape == (7, 5)
    t2v, v2t = direct_ranks(res["sim"], ds.caption_video_index.tolist(), 5)
    assert (res["ranks"]["t2v"] + 1).tolist() == t2v.tolist()
    assert (res["ranks"]["v2t"] + 1).tolist() == v2t.tolist()
    assert res["t2v"]["R1"] == pytest.approx(100.0 * np.mean(t2v <= 1))
    assert res["v2t"]["MeanR"] == pytest.approx(float(np.mean(v2t)))


# ------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_split_is_video_disjoint_and_keeps_every_row(tmp_path, capsys, ext):
    rows = [(f"v{i % 7}.mp4", f"caption {i}", str(i % 3), str(i % 3 + 2)) for i in range(40)]
    ann = write_rows(tmp_path / f"all{ext}", rows)
    assert split_main([ann, "--out_dir", str(tmp_path / "s"), "--test_fraction", "0.3", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    _, _, train = read_rows(str(tmp_path / "s" / f"train{ext}"))
    _, _, test = read_rows(str(tmp_path / "s" / f"test{ext}"))
    train_files, test_files = {r[2] for r in train}, {r[2] for r in test}
    assert not train_files & test_files
    assert len(test_files) == 2 and len(train_files) == 5  # round(0.3 * 7)
    assert len(train) + len(test) == 40
    assert f"train: 5 video files, {len(train)} rows" in out and f"test: 2 video files, {len(test)} rows" in out
    # the rows are the input's rows (every caption once), readable as annotations
    _, _, original = read_rows(ann)
    assert sorted(str(r[1]) for r in train + test) == sorted(str(r[1]) for r in original)
    # the seed decides the split
    assert split_main([ann, "--out_dir", str(tmp_path / "s2"), "--test_fraction", "0.3", "--seed", "4"]) == 0
    assert (tmp_path / "s2" / f"test{ext}").read_bytes() == (tmp_path / "s" / f"test{ext}").read_bytes()


def test_split_bad_input(tmp_path, capsys):
    bad = tmp_path / "x.txt"
    bad.write_text("video\nv.mp4\n")
    assert split_main([str(bad), "--out_dir", str(tmp_path / "o")]) == 2
    assert "unknown annotation file extension '.txt'" in capsys.readouterr().err
    one = write_rows(tmp_path / "one.csv", [("v.mp4", "c", "", "")])
    assert split_main([one, "--out_dir", str(tmp_path / "o")]) == 2
    assert "at least 2 distinct video files" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ bad input
BAD = [
    ("missing column", "video,text\na.mp4,hello\n", "bad.csv line 1: missing column 'caption'"),
    ("empty caption", "video,caption\na.mp4,hello\nb.mp4,\n", "bad.csv line 3 column 'caption': empty value"),
    ("start not a number", "video,caption,start,end\na.mp4,hi,zero,4\n",
     "bad.csv line 2 column 'start': 'zero' is not a number"),
    ("start not before end", "video,caption,start,end\na.mp4,hi,5,4\n",
     "bad.csv line 2 column 'start': 5 is not before end 4"),
    ("start equal to end", "video,caption,start,end\na.mp4,hi,4,4.0\n",   # an empty span
     "bad.csv line 2 column 'start': 4 is not before end 4"),
    ("only one of start/end", "video,caption,start,end\na.mp4,hi,1,\n", "bad.csv line 2 column 'end': empty"),
    ("one id, two files", "video,caption,video_id\na.mp4,hi,x\nb.mp4,ho,x\n",
     "bad.csv line 3 column 'video': video_id 'x' is already another video"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_line_and_column(media, tmp_path, name, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError) as exc:
        build_test_dataset(args_for(media, str(path)), None)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_jsonl_missing_key_and_non_utf8_and_unknown_extension(media, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4"}\n', encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad.jsonl line 2: missing key 'caption'"):
        build_test_dataset(args_for(media, str(path)), None)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("video,caption\na.mp4,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"latin.csv line 2: not UTF-8"):
        build_test_dataset(args_for(media, str(latin)), None)
    with pytest.raises(AnnotationError, match=r"--val_csv .*ann.xlsx: unknown annotation file extension '.xlsx'"):
        build_test_dataset(args_for(media, str(tmp_path / "ann.xlsx")), None)


def test_duplicate_rows_are_dropped_warned_and_counted(media, tmp_path, caplog):
    rows = ROWS + [ROWS[0], ROWS[4]]
    with caplog.at_level(logging.WARNING):
        ds = build_test_dataset(args_for(media, write_rows(tmp_path / "dup.csv", rows)), None)
    assert ds.num_captions == 7
    assert any("2 duplicate row(s)" in r.getMessage() and "dup.csv line 9" in r.getMessage() for r in caplog.records)


def test_test_videos_in_training_are_warned_with_the_count(media, tmp_path, caplog):
    from training.data_checks import warn_test_videos_in_training

    train = write_rows(tmp_path / "train.csv", [ROWS[0], ROWS[3]])
    test = build_test_dataset(args_for(media, write_rows(tmp_path / "test.csv")), None)
    args = args_for(media, None, train)
    with caplog.at_level(logging.WARNING):
        assert warn_test_videos_in_training(args, None, test) == 2
    assert any("2 of 3 test video files also appear in the training file" in r.getMessage() for r in caplog.records)
    disjoint = write_rows(tmp_path / "train2.csv", [ROWS[2]])
    test = build_test_dataset(args_for(media, write_rows(tmp_path / "test2.csv", [ROWS[0]])), None)
    assert warn_test_videos_in_training(args_for(media, None, disjoint), None, test) == 0


def test_unreadable_span_video_stops_or_is_left_out(media, tmp_path, capsys):
    from training.data_checks import check_spans

    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 10)
    rows = [("a.mp4", "ok", "", ""), ("broken.mp4", "broken", "0", "2")]
    args = args_for(media, write_rows(tmp_path / "b.csv", rows))
    args.features_path = str(tmp_path)
    os.symlink(media / "a.mp4", tmp_path / "a.mp4")
    ds = build_test_dataset(args, None)
    with pytest.raises(SystemExit):
        check_spans(ds, "test", skip=False, clip_to_video=False)
    err = capsys.readouterr().err
    assert "broken.mp4 (b.csv line 3:" in err and "--skip_bad_videos" in err
    record = check_spans(ds, "test", skip=True, clip_to_video=False)
    assert record["videos"] == 1 and ds.num_videos == 1 and ds.captions == ["ok"]


def main_py(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_main_py_bad_inputs_one_line_exit_2(media, tmp_path):
    """Through main.py: an unknown extension and a missing video end in one line naming the flag or the file
    and its row, status 2; the earlier run in --output_dir is refused, untouched."""
    from preprocess.make_tiny_clip import write_tiny_clip

    clip = write_tiny_clip([r[1] for r in ROWS], str(tmp_path / "clip"), num_merges=20)
    rows = [("a.mp4", "fine", "", ""), ("gone.mp4", "missing file", "", "")]
    ann = write_rows(tmp_path / "test.csv", rows)
    common = ["--datatype", "custom", "--features_path", media, "--do_eval", "1", "--pretrained_dir",
              tmp_path / "clip", "--pretrained_clip_name", "tiny-clip.pt", "--bpe_path", clip["bpe"],
              "--max_frames", "4", "--max_words", "16", "--unified_transformer_layers", "2", "--device", "cpu",
              "--cpu_tuning", "0"]
    proc = main_py([*common, "--val_csv", tmp_path / "test.txt", "--output_dir", tmp_path / "o1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--val_csv" in proc.stderr and "unknown annotation file extension '.txt'" in proc.stderr
    proc = main_py([*common, "--val_csv", ann, "--output_dir", tmp_path / "o2"], tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("main.py: error: ")
    assert "gone.mp4 (test.csv line 3: file not found)" in last and "--skip_bad_videos" in last
    assert not (tmp_path / "o2" / "results.json").exists()


def test_missing_video_is_named_with_its_row_or_left_out(media, tmp_path, capsys):
    from training.data_checks import leave_out_bad_video_files

    rows = [("a.mp4", "fine", "", ""), ("gone.mp4", "missing file", "", "")]
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "test.csv", rows)), None)
    with pytest.raises(SystemExit):
        leave_out_bad_video_files(ds, "test", skip=False, progress=False)
    err = capsys.readouterr().err
    assert "gone.mp4 (test.csv line 3: file not found)" in err and len(err.strip().splitlines()) == 1
    record = leave_out_bad_video_files(ds, "test", skip=True, progress=False)
    assert record["videos"] == 1 and ds.captions == ["fine"]


# ------------------------------------------------------------------------------------ --init_checkpoint
def test_init_checkpoint_starts_a_new_run_and_resume_continues(tmp_path):
    from tests.toy import run_toy
    from training.outputs import CKPT

    fast = dict(cpu_tuning=0, no_tensorboard=True)
    first = run_toy(str(tmp_path / "first"), epochs=1, **fast)
    ckpt = str(tmp_path / "first" / CKPT)
    steps = first["global_step"]
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1 and steps > 0

    init = run_toy(str(tmp_path / "init"), epochs=1, do_eval=1, do_train=1, init_checkpoint=ckpt, **fast)
    evals = init["results"]["evaluations"]
    # evaluated before training with the checkpoint's weights: the first run's last numbers
    assert evals[0]["epoch"] == 0 and evals[0]["t2v"] == first["results"]["evaluations"][-1]["t2v"]
    # a new run: epoch 1 again, steps from 0 (a new optimiser and schedule)
    assert [e["epoch"] for e in evals[1:]] == [1] and init["global_step"] == steps
    assert evals[1]["t2v"] != evals[0]["t2v"] or evals[1]["train_loss"] != first["results"]["evaluations"][-1][
        "train_loss"]
    record = json.loads((tmp_path / "init" / "reproducibility.json").read_text())
    assert record["init_checkpoint"]["path"] == os.path.abspath(ckpt)
    assert record["init_checkpoint"]["kind"] == "ours" and record["init_checkpoint"]["epoch"] == 1
    assert len(record["init_checkpoint"]["sha256"]) == 64 and record["resume"] is None

    resumed = run_toy(str(tmp_path / "first"), epochs=2, resume=ckpt, **fast)
    assert [e["epoch"] for e in resumed["results"]["evaluations"]] == [1, 2]  # continues with epoch 2
    assert resumed["global_step"] == 2 * steps


def test_init_checkpoint_model_flags_must_match(tmp_path, capsys):
    from tests.toy import run_toy
    from training.outputs import CKPT

    run_toy(str(tmp_path / "first"), epochs=1, cpu_tuning=0, no_tensorboard=True)
    ckpt = str(tmp_path / "first" / CKPT)
    with pytest.raises(SystemExit) as exc:
        run_toy(str(tmp_path / "other"), epochs=1, init_checkpoint=ckpt, global_visual_prompt_length=3,
                model_kwargs={"global_visual_prompt_length": 3})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--init_checkpoint" in err and "--global_visual_prompt_length 2" in err
    with pytest.raises(SystemExit):
        run_toy(str(tmp_path / "other2"), epochs=1, init_checkpoint=ckpt, resume=ckpt)
    assert "give one of them" in capsys.readouterr().err


def test_resume_with_another_model_flag_is_refused_for_training(tmp_path, capsys):
    """--resume with a model flag the checkpoint was not trained with: the weights load when the shapes
    agree (--max_frames, prompt lengths of the linear latent space), so the run would go on silently as
    another model; training is refused in one line, evaluation warns."""
    from tests.toy import run_toy
    from training.outputs import CKPT

    fast = dict(cpu_tuning=0, no_tensorboard=True)
    run_toy(str(tmp_path / "first"), epochs=1, **fast)
    ckpt = str(tmp_path / "first" / CKPT)
    before = (tmp_path / "first" / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        run_toy(str(tmp_path / "first"), epochs=2, resume=ckpt, max_frames=3, model_kwargs={"max_frames": 3}, **fast)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--resume {ckpt} was trained with --max_frames 2; this run has --max_frames 3" in err
    assert (tmp_path / "first" / "results.json").read_bytes() == before
    run_toy(str(tmp_path / "eval"), do_train=0, do_eval=1, resume=ckpt, max_frames=3, model_kwargs={"max_frames": 3},
            **fast)
    assert ("WARNING dgl: [resume] " + ckpt + " was trained with --max_frames 2; this evaluation runs with --max_frames 3"
            in (tmp_path / "eval" / "log.txt").read_text())


def test_a_broken_input_fails_before_the_kernels_are_timed(media, tmp_path, monkeypatch, capsys):
    """main.py checks its data before it chooses kernels: the per-use timing (a few training steps per
    candidate, up to a minute at 12 layers) and the bf16 rate check are not run for a run that ends on a
    missing video; the same run on good data does run them (so the recording below is what main.py calls)."""
    import main
    import modules.backends
    import runtime.cpu
    from preprocess.make_tiny_clip import write_tiny_clip

    calls = []
    check = modules.backends.Fp32Check(exact=True, error_mkl=1e-7, error_onednn=1e-7, speedup=1.0)
    monkeypatch.setattr(modules.backends, "_cached_fp32_check", lambda threads: calls.append("fp32 check") or check)
    monkeypatch.setattr(modules.backends, "_cached_attention_times", lambda shape, dtype, threads: calls.append(
        "attention timing") or {(kind, use): 1.0 if kind == "math" else 2.0 for kind in ("flash", "math")
                                for use in modules.backends.USES})
    monkeypatch.setattr(modules.backends, "time_candidates",
                        lambda runs, rounds: calls.append("model timing") or {name: 1.0 for name in runs})
    monkeypatch.setattr(runtime.cpu, "bf16_speedup", lambda: calls.append("bf16 rate") or 1.0)
    clip = write_tiny_clip([r[1] for r in ROWS], str(tmp_path / "clip"), num_merges=20)
    common = ["--datatype", "custom", "--features_path", media, "--do_eval", "1", "--pretrained_dir",
              tmp_path / "clip", "--pretrained_clip_name", "tiny-clip.pt", "--bpe_path", clip["bpe"],
              "--max_frames", "4", "--max_words", "16", "--unified_transformer_layers", "2", "--device", "cpu",
              "--eval_precision", "bf16", "--no_tensorboard", "--no_progress", "--threads", "1",
              "--num_thread_reader", "0"]
    broken = write_rows(tmp_path / "broken.csv", [("a.mp4", "fine", "", ""), ("gone.mp4", "missing file", "", "")])
    with pytest.raises(SystemExit) as stopped:
        main.main([str(a) for a in [*common, "--val_csv", broken, "--output_dir", tmp_path / "o1"]])
    assert stopped.value.code == 2
    assert "gone.mp4 (broken.csv line 3: file not found)" in capsys.readouterr().err.strip().splitlines()[-1]
    assert calls == []
    good = write_rows(tmp_path / "good.csv", [("a.mp4", "fine", "", ""), ("b.mp4", "also fine", "", "")])
    assert main.main([str(a) for a in [*common, "--val_csv", good, "--output_dir", tmp_path / "o2"]]) == 0
    assert {"fp32 check", "model timing", "bf16 rate"} <= set(calls)
