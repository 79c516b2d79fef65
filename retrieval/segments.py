"""Cut a video into the time ranges that an index holds one feature each for, and merge ranked ranges.

Modes (``index --segments``):

* ``whole``: one range, the whole file (entries carry ``start``/``end`` None);
* ``windows``: ``--window`` seconds every ``--stride`` seconds;
* ``shots``: PySceneDetect's content detector finds the cuts; shots shorter than ``--min_len`` are
  merged with their neighbour and shots longer than ``--max_len`` are split into equal parts;
* ``auto``: ``whole`` for a file up to ``--whole_up_to`` seconds, ``shots`` above.

Boundaries are whole seconds: each range is encoded through ``dataloaders.video.load_video(start=,
end=)``, which reads a clip the way the datasets' loaders do (start and end cut to whole seconds), so a
boundary that is not a whole second would be encoded as another range than the one reported. The last
range of a file ends at its duration rounded up to a whole second (the frames past the file's end do
not exist, so this reads up to the last frame).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MODES = ("auto", "whole", "shots", "windows")
MIN_SHOT_SECONDS = 0.5  # the shot detector's shortest shot


@dataclass(frozen=True)
class Segmentation:
    """How files are cut; recorded in the index (a different cut would give other entries)."""
    mode: str = "auto"
    min_len: int = 2            # shots: shorter ones are merged (seconds)
    max_len: int = 20           # shots: longer ones are split (seconds)
    window: int = 8             # windows: length (seconds)
    stride: int = 4             # windows: step (seconds)
    whole_up_to: int = 60       # auto: whole files up to this duration (seconds), shots above
    threshold: float = 27.0     # shots: PySceneDetect ContentDetector threshold

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--segments must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.min_len < 1 or self.max_len < self.min_len:
            raise ValueError(f"need 1 <= --min_len <= --max_len, got --min_len {self.min_len} --max_len {self.max_len}")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"--window and --stride must be at least 1 second, got {self.window} and {self.stride}")
        if self.whole_up_to < 0 or self.threshold <= 0:
            raise ValueError("--whole_up_to must be >= 0 and --shot_threshold > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"--segments {self.mode}"]
        if self.mode in ("auto", "shots"):
            parts += [f"--min_len {self.min_len}", f"--max_len {self.max_len}", f"--shot_threshold {self.threshold:g}"]
        if self.mode == "auto":
            parts.append(f"--whole_up_to {self.whole_up_to}")
        if self.mode == "windows":
            parts += [f"--window {self.window}", f"--stride {self.stride}"]
        return " ".join(parts)


def whole_seconds_end(duration: float) -> int:
    """The whole second that a range ending at the file's end is given (at least 1)."""
    return max(1, math.ceil(duration - 1e-6))


def window_ranges(duration: float, window: int, stride: int) -> list[tuple[int, int]]:
    """[(start, end)] every ``stride`` seconds, ``window`` long, the last one ending at the file's end.

    A window that would start inside the last one's span and end at the file's end adds nothing and is
    not made."""
    end_all = whole_seconds_end(duration)
    ranges = []
    start = 0
    while True:
        end = min(start + window, end_all)
        ranges.append((start, end))
        if end >= end_all:
            break
        start += stride
    return ranges


def merge_and_split(boundaries: list[float], duration: float, min_len: int, max_len: int) -> list[tuple[int, int]]:
    """Shots between ``boundaries`` (cut times in seconds), rounded to whole seconds, merged to at least
    ``min_len`` and split to at most ``max_len`` seconds.

    A shot shorter than ``min_len`` joins the following shot (the last one joins the one before); a shot
    longer than ``max_len`` is cut into ``ceil(length / max_len)`` parts of whole seconds, as equal as
    possible (longer parts first).
    """
    end_all = whole_seconds_end(duration)
    cuts = sorted({int(round(b)) for b in boundaries if 0 < round(b) < end_all})
    edges = [0, *cuts, end_all]
    shots = [[a, b] for a, b in zip(edges[:-1], edges[1:])]
    merged: list[list[int]] = []
    pending = None
    for shot in shots:
        if pending is not None:
            shot = [pending[0], shot[1]]
            pending = None
        if shot[1] - shot[0] < min_len:
            pending = shot
        else:
            merged.append(shot)
    if pending is not None:
        if merged:
            merged[-1][1] = pending[1]
        else:
            merged.append(pending)
    out = []
    for a, b in merged:
        length = b - a
        parts = max(1, math.ceil(length / max_len))
        base, extra = divmod(length, parts)
        start = a
        for i in range(parts):
            end = start + base + (1 if i < extra else 0)
            out.append((start, end))
            start = end
    return out


def detect_shot_boundaries(path: str, threshold: float = 27.0) -> list[float]:
    """Cut times (seconds) of ``path`` found by PySceneDetect's ContentDetector.

    The detector's shortest shot is half a second (its default, 15 frames, is half a second at 30 fps,
    but five seconds of a 3 fps video, whose cuts it would hide); shots shorter than ``--min_len`` are
    merged afterwards anyway. Raises RuntimeError naming the file when it cannot be read or scenedetect
    is missing."""
    try:
        from scenedetect import ContentDetector, SceneManager, open_video
    except ImportError as err:  # pragma: no cover - scenedetect is in requirements.txt
        raise RuntimeError("--segments shots needs PySceneDetect (pip install 'scenedetect[opencv-headless]')") \
            from err
    try:
        video = open_video(path, backend=_scenedetect_backend())
        min_frames = max(1, round(MIN_SHOT_SECONDS * float(video.frame_rate or 30)))
        manager = SceneManager()
        manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_frames))
        manager.detect_scenes(video, show_progress=False)
        scenes = manager.get_scene_list(start_in_scene=True)
    except Exception as err:  # noqa: BLE001 - any failure is this file's failure
        text = str(err).strip().splitlines()
        raise RuntimeError(f"shot detection failed on {path}: {text[0] if text else type(err).__name__}") from err
    return [start.get_seconds() for start, _ in scenes[1:]]


def _scenedetect_backend() -> str:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "pyav"
    return "opencv"


def plan_ranges(seg: Segmentation, path: str, duration: float | None) -> list[tuple[int | None, int | None]]:
    """The ranges of one file: [(None, None)] for the whole file, else [(start, end)] whole seconds."""
    mode = seg.mode
    if mode == "auto":
        mode = "whole" if duration is None or duration <= seg.whole_up_to else "shots"
    if mode == "whole":
        return [(None, None)]
    if duration is None:
        raise RuntimeError(f"{path}: the frame rate is unknown, so it cannot be cut into time ranges")
    if mode == "windows":
        return window_ranges(duration, seg.window, seg.stride)
    return merge_and_split(detect_shot_boundaries(path, seg.threshold), duration, seg.min_len, seg.max_len)


# ------------------------------------------------------------------------------------------- merging
def format_time(seconds: float | None) -> str:
    """12:31, or 1:02:03 from an hour on."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_range(start: float | None, end: float | None) -> str:
    return f"{format_time(start)}-{format_time(end)}"


def merge_ranked(candidates, k: int, per_video: int | None = None):
    """The best ``k`` segments, with neighbouring or overlapping ones of one video merged into one range.

    ``candidates``: (score, row, path, start, end) best first; start/end None for a whole file. The
    segments are taken in rank order until ``k`` are taken; one that overlaps or touches a range of the
    same video already made joins it (ranges it bridges join too; the range keeps its best score), else
    it starts a new range, unless its video has ``per_video`` ranges already (then it is skipped and not
    counted). So at most ``k`` ranges come back, and only segments that both rank in the top ``k`` are
    merged: a larger ``k`` never grows a hit with segments ranked below it.

    Returns (ranges, exhausted): ranges as dicts {score, path, start, end, rows (best first)}, best
    first; exhausted is True when the candidates ran out before ``k`` segments were taken.
    """
    ranges: list[dict] = []
    by_video: dict[str, list[dict]] = {}
    taken = 0
    for score, row, path, start, end in candidates:
        if taken >= k:
            return sorted(ranges, key=lambda r: -r["score"]), False
        own = by_video.setdefault(path, [])
        if start is None or end is None:  # a whole file: one range per file
            touching = list(own)
        else:
            touching = [r for r in own if r["start"] is not None and start <= r["end"] and end >= r["start"]]
        if not touching and per_video is not None and len(own) >= per_video:
            continue
        taken += 1
        if touching:
            keep = touching[0]
            for other in touching[1:]:
                keep["start"], keep["end"] = min(keep["start"], other["start"]), max(keep["end"], other["end"])
                keep["score"] = max(keep["score"], other["score"])
                keep["rows"] += other["rows"]
                own.remove(other)
                ranges.remove(other)
            if start is not None:
                keep["start"], keep["end"] = min(keep["start"], start), max(keep["end"], end)
            keep["rows"].append(row)
            keep["score"] = max(keep["score"], score)
            continue
        new = {"score": score, "path": path, "start": start, "end": end, "rows": [row]}
        own.append(new)
        ranges.append(new)
    return sorted(ranges, key=lambda r: -r["score"]), taken < k
