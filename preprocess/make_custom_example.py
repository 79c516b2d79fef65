"""A small captioned-video collection in the ``--datatype custom`` format, for the worked example of
docs/custom-data.md (deterministic from ``--seed``).

Written under OUT::

    videos/short/clip_NNN.mp4   one coloured shape moving in two steps (4 s at 3 fps, 32 x 32 px)
    videos/long/long_NN.mp4     three such scenes one after the other (12 s): annotated as spans
    annotations.csv             video, caption, start, end   (two captions per clip or span; the spans of
                                a long video have start/end, short clips leave them empty)
    queries.csv                 labelled queries for `search_videos.py evaluate`: query, video (short clips,
                                worded differently from the captions)
    vocabulary.txt              every caption and query, one per line (to learn a small BPE vocabulary)

CLI: ``python -m preprocess.make_custom_example OUT [--num_short 24] [--num_long 8] [--seed 0]``.
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import sys
from typing import Optional

import numpy as np

from runtime.errors import OneLineArgumentParser, first_line
from runtime.files import OutputWriteError, atomic_write_text

from .ffmpeg_tools import write_video

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 220, 40),
           "white": (240, 240, 240)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CAPTIONS = ("a {colour} {shape} moves {first} then {second}",
            "the {colour} {shape} goes {first} and then {second}")
QUERY = "{colour} {shape} going {first} and {second}"
FPS = 3.0
SCENE_FRAMES = 12  # 4 s per scene
SIZE = 32


def render_scene(colour: str, shape: str, first: str, second: str, rng: np.random.Generator,
                 frames: int = SCENE_FRAMES, size: int = SIZE) -> np.ndarray:
    """uint8 RGB ``(frames, size, size, 3)``: the shape moves ``first`` over the first half, then ``second``."""
    step = 0.3 * size
    d1, d2 = np.array(DIRECTIONS[first], float), np.array(DIRECTIONS[second], float)
    start = size / 2.0 - (d1 + d2) * step / 2.0 + rng.uniform(-0.05, 0.05, 2) * size
    half = frames // 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = size / 7.0
    out = np.empty((frames, size, size, 3), np.uint8)
    out[:] = rng.integers(10, 60, size=3).astype(np.uint8)
    for t in range(frames):
        if t < half:
            centre = start + d1 * step * t / max(half - 1, 1)
        else:
            centre = start + d1 * step + d2 * step * (t - half + 1) / max(frames - half, 1)
        dx, dy = xx - centre[0], yy - centre[1]
        if shape == "square":
            mask = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        elif shape == "circle":
            mask = dx * dx + dy * dy <= radius * radius
        else:
            mask = (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2.0)
        out[t][mask] = COLOURS[colour]
    return out


def _scenes(count: int, rng: np.random.Generator) -> list[dict]:
    combos = list(itertools.product(COLOURS, SHAPES, itertools.permutations(DIRECTIONS, 2)))
    picks = rng.permutation(len(combos))[:count] if count <= len(combos) else rng.integers(0, len(combos), count)
    return [{"colour": c, "shape": s, "first": a, "second": b} for c, s, (a, b) in (combos[i] for i in picks)]


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def make_custom_example(out_dir: str, num_short: int = 24, num_long: int = 8, seed: int = 0) -> dict:
    """Write the collection; returns the paths and counts. A folder that already holds another collection
    (other annotations, or videos this one does not write, which an index of the folder would take in) is
    refused with a ValueError before anything is written; the same collection is written again."""
    if num_short < 1 or num_long < 0:
        raise ValueError(f"need --num_short >= 1 and --num_long >= 0, got {num_short}, {num_long}")
    rng = np.random.default_rng(seed)
    scenes = _scenes(num_short + 3 * num_long, rng)
    rows, queries, videos = [], [], []
    for i in range(num_short):
        scene = scenes[i]
        video = f"videos/short/clip_{i:03d}.mp4"
        videos.append((video, [scene]))
        rows += [[video, template.format(**scene), "", ""] for template in CAPTIONS]
        queries.append([QUERY.format(**scene), video])
    seconds = SCENE_FRAMES / FPS
    for j in range(num_long):
        parts = scenes[num_short + 3 * j: num_short + 3 * j + 3]
        video = f"videos/long/long_{j:02d}.mp4"
        videos.append((video, parts))
        for k, scene in enumerate(parts):
            start, end = k * seconds, (k + 1) * seconds
            rows += [[video, template.format(**scene), f"{start:g}", f"{end:g}"] for template in CAPTIONS]
    annotations = os.path.join(out_dir, "annotations.csv")
    query_file = os.path.join(out_dir, "queries.csv")
    vocabulary = os.path.join(out_dir, "vocabulary.txt")
    texts = {annotations: _csv(["video", "caption", "start", "end"], rows),
             query_file: _csv(["query", "video"], queries),
             vocabulary: "".join(r[1] + "\n" for r in rows) + "".join(q[0] + "\n" for q in queries)}
    _refuse_another_collection(out_dir, texts, {os.path.normpath(v) for v, _ in videos})
    for video, parts in videos:  # rendered in the order of the scenes: the same rng draws as ever
        write_video(os.path.join(out_dir, video), np.concatenate([render_scene(**s, rng=rng) for s in parts]),
                    fps=FPS)
    for path, text in texts.items():
        atomic_write_text(path, text)
    return {"annotations": annotations, "queries": query_file, "vocabulary": vocabulary,
            "videos": num_short + num_long, "clips": num_short + 3 * num_long, "captions": len(rows)}


def _refuse_another_collection(out_dir: str, texts: dict, videos: set) -> None:
    for path, text in texts.items():
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8", newline="") as f:
                    same = f.read() == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                raise ValueError(f"{out_dir} already holds another collection ({path} differs from this one's); "
                                 "choose another folder, or remove it")
    for folder, _, files in os.walk(os.path.join(out_dir, "videos")):
        for name in sorted(files):
            relative = os.path.normpath(os.path.relpath(os.path.join(folder, name), out_dir))
            if relative not in videos:
                raise ValueError(f"{out_dir} already holds videos this collection does not write "
                                 f"({os.path.join(out_dir, relative)}); choose another folder, or remove them")


def main(argv: Optional[list[str]] = None) -> int:
    p = OneLineArgumentParser(prog="make_custom_example", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num_short", type=int, default=24, help="short clips (one scene each)")
    p.add_argument("--num_long", type=int, default=8, help="long videos (three scenes each, annotated as spans)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        info = make_custom_example(args.out_dir, args.num_short, args.num_long, args.seed)
    except (ValueError, RuntimeError, OutputWriteError) as exc:
        sys.stderr.write(f"make_custom_example: error: {first_line(exc)}\n")
        return 2
    print(f"{info['videos']} videos ({info['clips']} clips or spans), {info['captions']} captions: "
          f"{info['annotations']}; labelled queries: {info['queries']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
