"""Moment accuracy: find a known clip inside long videos made by concatenating clips, by its caption.

The demo's test clips (``python -m demo`` writes them, with a trained DGL) are joined, ``--clips_per_video``
at a time and in their listed order, into long videos; clip i of a long video spans ``[t_i, t_i + d_i]``
seconds. The long videos are indexed with ``--segments shots`` and with ``--segments windows``
(``search_videos.py index``), and each clip's caption is a query. A query scores when the top-1 range is
in the right long video and overlaps the clip with temporal IoU >= 0.5.

The defaults suit the demo's clips (4 frames at 3 fps: 1.3 s): shots of at least 1 s (`--min_len 1`) and
windows of 2 s every second; ranges are whole seconds (the datasets' span rule).

Also printed, per segmentation: the oracle (the fraction of clips that some indexed range covers with
tIoU >= 0.5: the most any ranking could reach with these ranges) and chance (a uniformly random range).

    python -m demo --out demo_output                     # once: data + trained model
    python benchmarks/bench_moments.py --demo_out demo_output
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def build_long_videos(data: str, out: str, per_video: int, limit: int | None) -> list[dict]:
    """[{video_id, caption, path (long video), start, end}] and the long videos written under ``out``."""
    import decord

    from preprocess.ffmpeg_tools import write_video

    with open(os.path.join(data, "MSRVTT_JSFUSION_test.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:limit]
    clips = []
    for g in range(0, len(rows), per_video):
        group, frames, t = rows[g:g + per_video], [], 0
        fps = None
        path = os.path.join(out, f"long{g // per_video:02d}.mp4")
        for row in group:
            reader = decord.VideoReader(os.path.join(data, "videos", row["video_id"] + ".mp4"))
            fps = fps or float(reader.get_avg_fps())
            x = reader.get_batch(list(range(len(reader)))).asnumpy()
            clips.append({"video_id": row["video_id"], "caption": row["sentence"], "path": path,
                          "start": t / fps, "end": (t + len(x)) / fps})
            frames.append(x)
            t += len(x)
        write_video(path, np.concatenate(frames), fps=fps)
    return clips


def evaluate(index, clips: list[dict], k: int) -> dict:
    texts = [c["caption"] for c in clips]
    top = [hits[0] for hits in index.search(texts, k=k)]
    scored = []
    for c, h in zip(clips, top):
        end = h.end if h.end is not None else h.entry.get("duration")
        start = h.start if h.start is not None else 0.0
        scored.append(h.path == c["path"] and tiou((start, end), (c["start"], c["end"])) >= 0.5)
    return {"top1": float(np.mean(scored)), "lengths": [((h.end or 0) - (h.start or 0)) for h in top]}


def oracle_and_chance(index, clips: list[dict]) -> tuple[float, float]:
    entries = index.entries
    cover, chance = [], []
    for c in clips:
        good = [e for e in entries if e["path"] == c["path"]
                and tiou((e["start"], e["end"]), (c["start"], c["end"])) >= 0.5]
        cover.append(bool(good))
        chance.append(len(good) / len(entries))
    return float(np.mean(cover)), float(np.mean(chance))


def main() -> int:
    from runtime.errors import finite_float

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo_out", default="demo_output", help="the folder `python -m demo --out` wrote")
    p.add_argument("--clips_per_video", type=int, default=12)
    p.add_argument("--limit", type=int, default=None, help="use only the first N test clips")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--min_len", type=int, default=1)
    p.add_argument("--max_len", type=int, default=8)
    p.add_argument("--shot_threshold", type=finite_float, default=27.0, help="PySceneDetect ContentDetector threshold")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5], help="top-1 of a search for k ranges (merging "
                                                                    "depends on k)")
    p.add_argument("--work", default=None, help="keep the long videos and indexes here (default: a temp folder)")
    args = p.parse_args()

    from retrieval.cli import main as search_videos
    from retrieval.index import VideoIndex
    from retrieval.model_io import load_model

    data = os.path.join(args.demo_out, "data")
    ckpt = os.path.join(args.demo_out, "run", "ckpt.best.pth.tar")
    clip_file = next(os.path.join(args.demo_out, "pretrained", f) for f in os.listdir(os.path.join(args.demo_out,
                                                                                                  "pretrained"))
                     if f.endswith(".pt"))
    with open(os.path.join(args.demo_out, "run", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench_moments_"))
    videos = os.path.join(work, "long")
    os.makedirs(videos, exist_ok=True)
    clips = build_long_videos(data, videos, args.clips_per_video, args.limit)
    lengths = [c["end"] - c["start"] for c in clips]
    print(f"{len(clips)} clips ({min(lengths):.1f}-{max(lengths):.1f} s, mean {np.mean(lengths):.1f} s) in "
          f"{len({c['path'] for c in clips})} long videos; model {ckpt}")
    r1 = results.get("best", results).get("t2v", {}).get("R1") if isinstance(results, dict) else None
    if r1 is not None:
        print(f"(the same model finds the right clip among the {len(clips)} separate test clips at text-to-video R@1 "
              f"{float(r1):.1f}%)")
    loaded = load_model(clip_file, ckpt)
    print(f"{'segments':>48} | {'ranges':>6} | " + " | ".join(f"top-1 tIoU>=.5 (k={k})" for k in args.k)
          + " | oracle | chance")
    for mode, flags in (("shots", ["--min_len", args.min_len, "--max_len", args.max_len, "--shot_threshold", args.shot_threshold]),
                        ("windows", ["--window", args.window, "--stride", args.stride])):
        idx = os.path.join(work, f"idx-{mode}")
        code = search_videos(["index", videos, "--index", idx, "--clip", clip_file, "--checkpoint", ckpt,
                              "--segments", mode, *map(str, flags), "--workers", "1", "--no_progress",
                              "--device", "cpu"])
        if code:
            return code
        index = VideoIndex.open(idx, model=loaded.model, tokenizer=loaded.tokenizer)
        scores = [evaluate(index, clips, k)["top1"] for k in args.k]
        oracle, chance = oracle_and_chance(index, clips)
        label = f"{mode} {' '.join(map(str, flags))}"
        print(f"{label:>48} | {len(index):>6} | " + " | ".join(f"{s:>20.3f}" for s in scores)
              + f" | {oracle:.3f}  | {chance:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
