"""Moment accuracy: find a known clip inside long videos made by concatenating clips, by its caption.

The demo's test clips (``python -m demo`` writes them, with a trained DGL) are joined, ``--clips_per_video``
at a time and in their listed order, into long videos; clip i of a long video spans ``[t_i, t_i + d_i]``
seconds (to the frame). The long videos are indexed (``search_videos.py index``) once per segmentation,
and each clip's caption is a query over all of them. Reported per segmentation, as moment retrieval is
measured (retrieval/moments.py; QVHighlights' definitions): R1@0.5 and R1@0.7 (the top-1 range is in the
right long video with temporal IoU >= 0.5 / 0.7), and mAP (average precision of the top 10 ranges, averaged
over the tIoU thresholds 0.5:0.05:0.95); next to them the oracle (the fraction of clips that some indexed
range covers with tIoU >= 0.5 / 0.7: the most any ranking could reach with these ranges) and chance (a
range drawn at random, tIoU >= 0.5); the number of ranges, the indexing speed (ranges per second, shot
detection included) and the index's size on disk.

The segmentations: the index's defaults for new indexes (frame-accurate ranges, one range per shot), with
PySceneDetect's threshold 27 as well, ranges of up to two and three consecutive shots (``--scales``),
frame-accurate windows, and the whole-second ranges of indexes made before (``--ranges seconds``). The
defaults suit the demo's clips (4 frames at 3 fps: 1.3 s): shots of at least 1 s (``--min_len 1``),
windows of 2 s every second, and a shot threshold of 20: the flat backgrounds of two neighbouring clips
can differ little, and the extra cuts a lower threshold finds inside a clip are merged away (a short shot
joins its neighbour across the weaker cut).

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
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from retrieval.moments import moment_metrics  # noqa: E402
from retrieval.segments import tiou  # noqa: E402


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


def predictions(index, texts: list[str], k: int) -> list[list[tuple]]:
    """Per query, the top-``k`` hits as (path, start, end, score); a whole file spans 0..its duration."""
    out = []
    for hits in index.search(texts, k=k):
        out.append([(h.path, 0.0 if h.start is None else h.start,
                     h.entry.get("duration") if h.end is None else h.end, h.score) for h in hits])
    return out


def oracle_and_chance(index, clips: list[dict]) -> tuple[float, float, float]:
    """(oracle at tIoU 0.5, oracle at 0.7, chance at 0.5)."""
    entries = index.entries
    cover5, cover7, chance = [], [], []
    for c in clips:
        overlaps = [tiou((e["start"], e["end"]), (c["start"], c["end"])) for e in entries if e["path"] == c["path"]]
        cover5.append(any(o >= 0.5 for o in overlaps))
        cover7.append(any(o >= 0.7 for o in overlaps))
        chance.append(sum(o >= 0.5 for o in overlaps) / len(entries))
    return float(np.mean(cover5)), float(np.mean(cover7)), float(np.mean(chance))


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


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
    p.add_argument("--shot_threshold", type=finite_float, default=20.0, help="PySceneDetect ContentDetector threshold")
    p.add_argument("--only", nargs="+", default=None, help="run only the segmentations whose label starts so")
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
    shots = ["--segments", "shots", "--min_len", args.min_len, "--max_len", args.max_len,
             "--shot_threshold", args.shot_threshold]
    windows = ["--segments", "windows", "--window", args.window, "--stride", args.stride]
    runs = [("shots", shots),
            ("shots --shot_threshold 27", [*shots[:-1], "27"]),
            ("shots --scales 2", [*shots, "--scales", 2]),
            ("shots --scales 3", [*shots, "--scales", 3]),
            ("windows --scales 1", [*windows, "--scales", 1]),
            ("windows --scales 2", [*windows, "--scales", 2]),
            ("shots, whole seconds", [*shots, "--scales", 1, "--ranges", "seconds"]),
            ("windows, whole seconds", [*windows, "--scales", 1, "--ranges", "seconds"])]
    if args.only:
        runs = [r for r in runs if any(r[0].startswith(o) for o in args.only)]
    texts = [c["caption"] for c in clips]
    truths = [[(c["path"], c["start"], c["end"])] for c in clips]
    print(f"{'segments':>28} | ranges | R1@0.5 | R1@0.7 |   mAP | oracle .5 / .7 | chance | ranges/s |  index")
    for label, flags in runs:
        idx = os.path.join(work, "idx-" + label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                           .replace(":", ""))
        t0 = time.perf_counter()
        code = search_videos(["index", videos, "--index", idx, "--clip", clip_file, "--checkpoint", ckpt,
                              *map(str, flags), "--workers", "1", "--no_progress", "--device", "cpu"])
        seconds = time.perf_counter() - t0
        if code:
            return code
        index = VideoIndex.open(idx, model=loaded.model, tokenizer=loaded.tokenizer)
        top1 = predictions(index, texts, 1)  # an index with whole-second ranges merges ranked neighbours: k matters
        top10 = predictions(index, texts, 10)
        m = moment_metrics(top10, truths)
        m["R1@0.5"], m["R1@0.7"] = (moment_metrics(top1, truths)[k] for k in ("R1@0.5", "R1@0.7"))
        oracle5, oracle7, chance = oracle_and_chance(index, clips)
        size = folder_bytes(os.path.join(idx, "shards"))
        print(f"{label:>28} | {len(index):>6} | {m['R1@0.5']:.3f}  | {m['R1@0.7']:.3f}  | {m['mAP']:.3f} | "
              f"{oracle5:.3f} / {oracle7:.3f}  | {chance:.3f}  | {len(index) / seconds:>8.1f} | {size / 1024:.0f} KiB",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
