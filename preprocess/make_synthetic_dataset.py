"""A small synthetic text-video dataset in the MSR-VTT layout, deterministic from a seed.

Each clip shows one coloured shape moving in two steps ("a red square moves left then up"): the
first half of the clip in one direction, the second half in another. Captions name the colour, the
shape and both motions in order. Two kinds of motion:

- ``continuous`` (the default): one path, the second move starting where the first ended, so the
  clip's frames trace an L whose corner tells "left then up" from "up then left" even out of order;
- ``from_centre``: each move starts at the centre of the frame (the clip cuts back to the centre
  between them), so a clip and its order-swapped twin ("up then left") show the same frames in the
  other order: only the order of the frames tells the two captions apart (the demo's world).

Besides the video captions, :func:`frame_caption` says what one frame shows (colour, shape, side of
the centre), and :func:`swapped_caption` is a caption with its two moves exchanged (the order probe).

Layout written (the file names the MSR-VTT loader expects)::

    <out>/MSRVTT_train.9k.csv       video_id
    <out>/MSRVTT_JSFUSION_test.csv  key,vid_key,video_id,sentence
    <out>/MSRVTT_data.json          {"videos": [...], "sentences": [{"video_id", "caption", "sen_id"}]}
    <out>/MSRVTT_val.csv            key,vid_key,video_id,sentence  (only with num_val > 0: held-out clips
                                    for choosing settings, laid out like the test file)
    <out>/order_probe.csv           split,video_id,caption,swapped  (each test / val caption and its twin
                                    with the two moves exchanged)
    <out>/videos/<video_id>.mp4     H.264 at 3 fps

CLI: ``python -m preprocess.make_synthetic_dataset OUT --num_train 200 --num_test 50 --size 32``.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from runtime.files import OutputWriteError, atomic_write_text

from .ffmpeg_tools import find_ffmpeg, write_video

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 220, 40),
    "purple": (165, 60, 205),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS = tuple((a, b) for a, b in itertools.permutations(DIRECTIONS, 2))  # 12 ordered pairs
TEMPLATES = (
    "a {colour} {shape} moves {first} then {second}",
    "the {colour} {shape} goes {first} and then {second}",
    "a {shape} in {colour} moving {first} first and {second} after",
)
FRAME_TEMPLATE = "a {colour} {shape} shifted {side}"
CENTRE_TEMPLATE = "a {colour} {shape} at the centre"
CENTRE_RADIUS = 0.1  # of the frame size: a shape nearer the centre than this is "at the centre"
MOTION_KINDS = ("continuous", "from_centre")
FPS = 3.0


@dataclass(frozen=True)
class ClipSpec:
    video_id: str
    colour: str
    shape: str
    first: str
    second: str
    num_frames: int
    size: int
    start_x: float
    start_y: float
    background: tuple[int, int, int]
    motion: str = "continuous"

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(colour=self.colour, shape=self.shape, first=self.first,
                                          second=self.second)


def swapped_caption(spec: ClipSpec, template: int = 0) -> str:
    """The caption of ``spec`` with its two moves exchanged ("left then up" -> "up then left")."""
    return TEMPLATES[template].format(colour=spec.colour, shape=spec.shape, first=spec.second,
                                      second=spec.first)


def frame_caption(spec: ClipSpec, t: int) -> str:
    """What frame ``t`` alone shows: colour, shape and on which side of the frame's centre the shape
    is (the larger of the two offsets decides; "up" is towards the top row), or that it is at the centre."""
    cx, cy = positions(spec)[t] - spec.size / 2.0
    if max(abs(cx), abs(cy)) < CENTRE_RADIUS * spec.size:
        return CENTRE_TEMPLATE.format(colour=spec.colour, shape=spec.shape)
    side = ("right" if cx > 0 else "left") if abs(cx) >= abs(cy) else ("down" if cy > 0 else "up")
    return FRAME_TEMPLATE.format(colour=spec.colour, shape=spec.shape, side=side)


def positions(spec: ClipSpec) -> np.ndarray:
    """Centre (x, y) of the shape in each frame: linear moves, ``first`` over the first half."""
    dist = 0.3 * spec.size
    half = spec.num_frames // 2
    d1, d2 = np.array(DIRECTIONS[spec.first], float), np.array(DIRECTIONS[spec.second], float)
    p0 = np.array([spec.start_x, spec.start_y])
    if spec.motion == "from_centre":
        # Frame t of the first half and frame half + t of the second are the same distance out, so
        # swapping the two moves only reorders the frames.
        return np.array([p0 + d1 * dist * (t + 1) / half if t < half else p0 + d2 * dist * (t - half + 1) / half
                         for t in range(spec.num_frames)])
    out = []
    for t in range(spec.num_frames):
        if t < half:
            p = p0 + d1 * dist * (t / max(half - 1, 1))
        else:
            p = p0 + d1 * dist + d2 * dist * ((t - half + 1) / max(spec.num_frames - half, 1))
        out.append(p)
    return np.array(out)


def render_clip(spec: ClipSpec) -> np.ndarray:
    """uint8 RGB frames ``(num_frames, size, size, 3)`` of the clip."""
    s = spec.size
    r = max(2.0, s / 7.0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    frames = np.empty((spec.num_frames, s, s, 3), np.uint8)
    frames[:] = np.array(spec.background, np.uint8)
    colour = np.array(COLOURS[spec.colour], np.uint8)
    for t, (cx, cy) in enumerate(positions(spec)):
        dx, dy = xx - cx, yy - cy
        if spec.shape == "square":
            mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        elif spec.shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        else:  # triangle pointing up
            mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
        frames[t][mask] = colour
    return frames


def make_specs(num_train: int, num_test: int, seed: int = 0, size: int = 32, min_frames: int = 12,
               max_frames: int = 18, num_val: int = 0, motion: str = "continuous") -> list[ClipSpec]:
    """Train specs first (``video0``..), then test specs, then validation specs; test clips have
    distinct captions while there are enough combinations (6 colours x 3 shapes x 12 motions = 216),
    and so do validation clips. ``from_centre`` clips have an even number of frames (two equal halves)."""
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16, got {size}")
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    if motion not in MOTION_KINDS:
        raise ValueError(f"motion must be one of {MOTION_KINDS}, got {motion!r}")
    even_counts = [n for n in range(min_frames, max_frames + 1) if n % 2 == 0 and n >= 2]
    if motion == "from_centre" and not even_counts:
        raise ValueError(f"from_centre clips need an even frame count in [{min_frames}, {max_frames}]")
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    test_pick = rng.permutation(len(combos))
    test_combos = [combos[i] for i in np.resize(test_pick, num_test)] if num_test else []
    train_combos = [combos[i] for i in rng.integers(0, len(combos), size=num_train)]
    val_combos = [combos[i] for i in np.resize(rng.permutation(len(combos)), num_val)] if num_val else []
    specs = []
    for i, (colour, shape, (first, second)) in enumerate(train_combos + test_combos + val_combos):
        if motion == "from_centre":
            d = np.zeros(2)
        else:
            d = (np.array(DIRECTIONS[first], float) + np.array(DIRECTIONS[second], float)) * 0.3 * size
        centre = size / 2.0 - d / 2.0 + rng.uniform(-0.05, 0.05, size=2) * size
        background = tuple(int(v) for v in rng.integers(10, 60, size=3))
        if motion == "from_centre":
            num_frames = int(even_counts[rng.integers(0, len(even_counts))])
        else:
            num_frames = int(rng.integers(min_frames, max_frames + 1))
        specs.append(ClipSpec(f"video{i}", colour, shape, first, second, num_frames, size, float(centre[0]),
                              float(centre[1]), background, motion))
    return specs


def _retrieval_csv(specs: list[ClipSpec]) -> str:
    """The test-file layout (caption i <-> video i), template 0 captions."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "vid_key", "video_id", "sentence"])
    for j, s in enumerate(specs):
        w.writerow([f"ret{j}", "msr" + s.video_id[len("video"):], s.video_id, s.caption(0)])
    return buf.getvalue()


def make_synthetic_dataset(out_dir: str, num_train: int = 200, num_test: int = 50, seed: int = 0,
                           size: int = 32, min_frames: int = 12, max_frames: int = 18,
                           workers: Optional[int] = None, crf: int = 18, keyint: Optional[int] = None,
                           num_val: int = 0, motion: str = "continuous") -> dict:
    """Write the dataset; returns ``{"root", "train_csv", "val_csv", "data_path", "features_path",
    "heldout_csv", "probe_csv"}`` (the first keys are the flag names the MSR-VTT loader reads; ``val_csv``
    is the test file, ``heldout_csv`` the validation clips' file, None without them). ``keyint`` puts a
    keyframe on every ``keyint``-th frame (x264's default GOP when None/0), as
    ``preprocess.compress_video --keyint``."""
    specs = make_specs(num_train, num_test, seed, size, min_frames, max_frames, num_val=num_val, motion=motion)
    root = os.path.abspath(out_dir)
    videos_dir = os.path.join(root, "videos")
    os.makedirs(videos_dir, exist_ok=True)
    ffmpeg = find_ffmpeg()

    def encode(spec: ClipSpec) -> None:
        path = os.path.join(videos_dir, spec.video_id + ".mp4")
        write_video(path, render_clip(spec), fps=FPS, crf=crf, keyint=keyint, ffmpeg=ffmpeg)

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(encode, specs))  # re-raises the first failure

    train, test, val = specs[:num_train], specs[num_train:num_train + num_test], specs[num_train + num_test:]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video_id"])
    w.writerows([s.video_id] for s in train)
    paths = {
        "root": root,
        "train_csv": os.path.join(root, "MSRVTT_train.9k.csv"),
        "val_csv": os.path.join(root, "MSRVTT_JSFUSION_test.csv"),
        "data_path": os.path.join(root, "MSRVTT_data.json"),
        "features_path": videos_dir,
        "heldout_csv": os.path.join(root, "MSRVTT_val.csv") if num_val else None,
        "probe_csv": os.path.join(root, "order_probe.csv"),
    }
    atomic_write_text(paths["train_csv"], buf.getvalue())
    atomic_write_text(paths["val_csv"], _retrieval_csv(test))
    if num_val:
        atomic_write_text(paths["heldout_csv"], _retrieval_csv(val))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "video_id", "caption", "swapped"])
    for split, group in (("test", test), ("val", val)):
        w.writerows([split, s.video_id, s.caption(0), swapped_caption(s, 0)] for s in group)
    atomic_write_text(paths["probe_csv"], buf.getvalue())
    sentences = []
    for s in specs:
        for k in range(len(TEMPLATES)):
            sentences.append({"caption": s.caption(k), "video_id": s.video_id, "sen_id": len(sentences)})
    split_of = ["train"] * len(train) + ["test"] * len(test) + ["val"] * len(val)
    data = {
        "info": {"description": f"synthetic moving shapes, seed {seed}", "fps": FPS, "motion": motion},
        "videos": [dict(video_id=s.video_id, split=split_of[i], id=i,
                        url=f"synthetic://{s.video_id}", **{"start time": 0.0, "end time": s.num_frames / FPS},
                        spec=asdict(s)) for i, s in enumerate(specs)],
        "sentences": sentences,
    }
    atomic_write_text(paths["data_path"], json.dumps(data, indent=1))
    return paths


PROG = "make_synthetic_dataset"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num_train", type=int, default=200)
    p.add_argument("--num_test", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="frame width and height in pixels (even)")
    p.add_argument("--min_frames", type=int, default=12)
    p.add_argument("--max_frames", type=int, default=18)
    p.add_argument("--num_val", type=int, default=0, help="validation clips (MSRVTT_val.csv), default 0")
    p.add_argument("--motion", default="continuous", choices=MOTION_KINDS,
                   help="continuous: one L-shaped path; from_centre: each move starts at the centre")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--keyint", type=int, default=0,
                   help="a keyframe every KEYINT frames (default 0: x264's default GOP)")
    a = p.parse_args(argv)
    if a.keyint < 0:
        p.error("--keyint must be >= 0")
    try:
        paths = make_synthetic_dataset(a.out_dir, a.num_train, a.num_test, a.seed, a.size, a.min_frames,
                                       a.max_frames, a.workers, keyint=a.keyint or None,
                                       num_val=a.num_val, motion=a.motion)
    except OutputWriteError as exc:  # names the file it was writing
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write the dataset to {a.out_dir}: {exc.strerror or exc}\n")
        return 2
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
