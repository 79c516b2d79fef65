"""Cut a video into the time ranges that an index holds one feature each for, and merge ranked ranges.

Modes (``index --segments``):

* ``whole``: one range, the whole file (entries carry ``start``/``end`` None);
* ``windows``: ``--window`` seconds every ``--stride`` seconds;
* ``shots``: PySceneDetect's content detector finds the cuts; shots shorter than ``--min_len`` are
  merged with their neighbour and shots longer than ``--max_len`` are split into equal parts;
* ``auto``: ``whole`` for a file up to ``--whole_up_to`` seconds, ``shots`` above.

``--scales N`` (shots and windows) adds ranges of 2..N consecutive shots (windows N times as long), so that
some range fits a moment longer than one shot; search then returns the best ranges with overlapping ones
suppressed (:func:`suppress_overlaps`).

Boundaries are frames in a new index (:func:`plan_frame_ranges`): a range is the frames ``first .. stop - 1``,
reported as ``first / fps`` .. ``stop / fps`` seconds and read back to the frame
(``dataloaders.video.exact_frame_span``). An index made before that (it records no ``ranges`` in its
sampling) has whole-second boundaries (:func:`plan_ranges`), each range read the way the datasets' loaders
read a clip (start and end cut to whole seconds); its last range ends at the duration rounded up to a
whole second (the frames past the file's end do not exist, so this reads up to the last frame).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MODES = ("auto", "whole", "shots", "windows")
MIN_SHOT_SECONDS = 0.3  # the shot detector's shortest shot (frame-accurate ranges)
MIN_SHOT_SECONDS_WHOLE = 0.5  # ... in an index with whole-second ranges, as such indexes were built
DEFAULT_SCALES = 1      # a new index: one range per shot (--scales 2 measured lower on single-shot moments,
                        # docs/search-moments.md)
NMS_IOU = 0.5           # search: a range overlapping a better one of its video with tIoU >= this is left out


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
    scales: int = DEFAULT_SCALES  # shots/windows: ranges of 1..scales consecutive shots (windows scales x long)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--segments must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.min_len < 1 or self.max_len < self.min_len:
            raise ValueError(f"need 1 <= --min_len <= --max_len, got --min_len {self.min_len} --max_len {self.max_len}")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"--window and --stride must be at least 1 second, got {self.window} and {self.stride}")
        if self.whole_up_to < 0 or self.threshold <= 0:
            raise ValueError("--whole_up_to must be >= 0 and --shot_threshold > 0")
        if self.scales < 1:
            raise ValueError(f"--scales must be at least 1, got {self.scales}")

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
        if self.mode != "whole":
            parts.append(f"--scales {self.scales}")
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
    return _merge_and_split_units([int(round(b)) for b in boundaries], end_all, min_len, max_len)


def _merge_and_split_units(cuts: list[int], end_all: int, min_len: int, max_len: int) -> list[tuple[int, int]]:
    """:func:`merge_and_split` in integer units (whole seconds, or frames): ``cuts`` inside ``(0, end_all)``."""
    cuts = sorted({c for c in cuts if 0 < c < end_all})
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
    return _split_long(merged, max_len)


def _split_long(shots, max_len: int) -> list[tuple[int, int]]:
    """Each (a, b) longer than ``max_len`` cut into ``ceil(length / max_len)`` parts, longer parts first."""
    out = []
    for a, b in shots:
        length = b - a
        parts = max(1, math.ceil(length / max_len))
        base, extra = divmod(length, parts)
        start = a
        for i in range(parts):
            end = start + base + (1 if i < extra else 0)
            out.append((start, end))
            start = end
    return out


def merge_across_weak_cuts(cuts: list[tuple[int, float]], end_all: int, min_len: int,
                           max_len: int) -> list[tuple[int, int]]:
    """Shots (in frames) between ``cuts`` ((frame, strength) inside ``(0, end_all)``), merged to at least
    ``min_len`` and split to at most ``max_len`` frames.

    The shortest shot under ``min_len`` is merged with a neighbour, again and again: across the weaker of
    its two cuts (the smaller content change; the next one on a tie), so that a short piece next to a
    cut between two sources joins its own footage and the strong cut stays. The first and last shots have
    one neighbour. Then a shot longer than ``max_len`` is cut into equal parts (longer ones first).
    """
    strength = {}
    for frame, value in cuts:
        if 0 < frame < end_all:
            strength[frame] = max(value, strength.get(frame, value))
    edges = [0, *sorted(strength), end_all]
    while len(edges) > 2:
        lengths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        i = min(range(len(lengths)), key=lambda j: (lengths[j], j))
        if lengths[i] >= min_len:
            break
        if i == 0:
            drop = 1
        elif i == len(lengths) - 1:
            drop = i
        else:
            drop = i if strength[edges[i]] < strength[edges[i + 1]] else i + 1
        del edges[drop]
    return _split_long(list(zip(edges[:-1], edges[1:])), max_len)


def detect_shot_boundaries(path: str, threshold: float = 27.0, min_shot: float = MIN_SHOT_SECONDS) -> list[float]:
    """Cut times (seconds) of ``path`` found by PySceneDetect's ContentDetector (:func:`detect_cuts`)."""
    return [seconds for seconds, _ in detect_cuts(path, threshold, min_shot)]


def detect_cuts(path: str, threshold: float = 27.0, min_shot: float = MIN_SHOT_SECONDS) -> list[tuple[float, float]]:
    """Cuts of ``path`` found by PySceneDetect's ContentDetector: (seconds, strength), the strength being
    the detector's content change (``content_val``) at the cut's first frame.

    The detector's shortest shot is ``min_shot`` seconds (its default, 15 frames, is half a second at 30 fps,
    but five seconds of a 3 fps video, whose cuts it would hide; and a cut less than that after a cut
    inside the footage is dropped, so it is kept short); shots shorter than ``--min_len`` are merged
    afterwards anyway. Raises RuntimeError naming the file when it cannot be read or scenedetect
    is missing."""
    try:
        from scenedetect import ContentDetector, SceneManager, StatsManager, open_video
    except ImportError as err:  # pragma: no cover - scenedetect is in requirements.txt
        raise RuntimeError("--segments shots needs PySceneDetect (pip install 'scenedetect[opencv-headless]')") \
            from err
    try:
        video = open_video(path, backend=_scenedetect_backend())
        min_frames = max(1, round(min_shot * float(video.frame_rate or 30)))
        stats = StatsManager()
        manager = SceneManager(stats_manager=stats)
        manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_frames))
        manager.detect_scenes(video, show_progress=False)
        scenes = manager.get_scene_list(start_in_scene=True)
        cuts = []
        for start, _ in scenes[1:]:
            value = stats.get_metrics(start.get_frames(), ["content_val"])[0]
            cuts.append((start.get_seconds(), float(value) if value is not None else float(threshold)))
    except Exception as err:  # noqa: BLE001 - any failure is this file's failure
        text = str(err).strip().splitlines()
        raise RuntimeError(f"shot detection failed on {path}: {text[0] if text else type(err).__name__}") from err
    return cuts


def _scenedetect_backend() -> str:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "pyav"
    return "opencv"


def plan_ranges(seg: Segmentation, path: str, duration: float | None) -> list[tuple[int | None, int | None]]:
    """The ranges of one file in an index with whole-second ranges: [(None, None)] for the whole file, else
    [(start, end)] whole seconds."""
    mode = seg.mode
    if mode == "auto":
        mode = "whole" if duration is None or duration <= seg.whole_up_to else "shots"
    if mode == "whole":
        return [(None, None)]
    if duration is None:
        raise RuntimeError(f"{path}: the frame rate is unknown, so it cannot be cut into time ranges")
    if mode == "windows":
        return sorted({r for j in range(1, seg.scales + 1) for r in window_ranges(duration, j * seg.window, seg.stride)})
    base = merge_and_split(detect_shot_boundaries(path, seg.threshold, MIN_SHOT_SECONDS_WHOLE), duration,
                           seg.min_len, seg.max_len)
    return with_scales(base, seg.scales)


def with_scales(base: list[tuple[int, int]], scales: int) -> list[tuple[int, int]]:
    """``base`` (consecutive ranges) and every run of 2..``scales`` consecutive ones joined, in start order
    (shorter first at a start)."""
    out = []
    for i in range(len(base)):
        for j in range(1, min(scales, len(base) - i) + 1):
            out.append((base[i][0], base[i + j - 1][1]))
    return out


def _frames(seconds: float, fps: float) -> int:
    return int(round(seconds * fps))


def frame_windows(num_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[(first, stop)]: ``window`` frames every ``stride`` frames, the last one ending at the last frame."""
    ranges, start = [], 0
    while True:
        stop = min(start + window, num_frames)
        ranges.append((start, stop))
        if stop >= num_frames:
            return ranges
        start += stride


def plan_frame_ranges(seg: Segmentation, path: str, num_frames: int, fps: float) -> list[tuple]:
    """The ranges of one file in a new index: [(None, None)] for the whole file, else [(start, end)] seconds
    that are frame boundaries (``first / fps``, ``stop / fps``; the frames ``first .. stop - 1``).

    Shots: PySceneDetect's cuts (frame times) are kept to the frame, then merged to ``--min_len`` (across
    the weaker cut, :func:`merge_across_weak_cuts`) and split
    to ``--max_len`` seconds (counted in frames); windows: ``--window`` seconds (in frames) every
    ``--stride``; both with ``--scales``. Raises RuntimeError naming the file when a window or stride is
    shorter than one frame, or the frame rate is unknown."""
    mode = seg.mode
    duration = num_frames / fps if fps > 0 else None
    if mode == "auto":
        mode = "whole" if duration is None or duration <= seg.whole_up_to else "shots"
    if mode == "whole":
        return [(None, None)]
    if duration is None or num_frames < 1:
        raise RuntimeError(f"{path}: the frame rate is unknown, so it cannot be cut into time ranges")
    if mode == "windows":
        window, stride = _frames(seg.window, fps), _frames(seg.stride, fps)
        if window < 1 or stride < 1:
            raise RuntimeError(f"{path}: --window {seg.window} / --stride {seg.stride} s is shorter than one frame "
                               f"at its {fps:g} fps")
        spans = sorted({r for j in range(1, seg.scales + 1) for r in frame_windows(num_frames, j * window, stride)})
    else:
        cuts = [(_frames(t, fps), strength) for t, strength in detect_cuts(path, seg.threshold)]
        base = merge_across_weak_cuts(cuts, num_frames, max(1, _frames(seg.min_len, fps)),
                                      max(1, _frames(seg.max_len, fps)))
        spans = with_scales(base, seg.scales)
    return [(round(a / fps, 6), round(b / fps, 6)) for a, b in spans]


# ------------------------------------------------------------------------------------------- merging
def format_time(seconds: float | None) -> str:
    """12:31, 12:31.4 (tenths where the time is not a whole second), or 1:02:03 from an hour on."""
    if seconds is None:
        return "?"
    tenths = int(round(seconds * 10))
    if tenths % 10 == 0:
        s = tenths // 10
        h, rest = divmod(s, 3600)
        m, sec = divmod(rest, 60)
        return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
    h, rest = divmod(tenths / 10, 3600)
    m, sec = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{sec:04.1f}" if h else f"{int(m)}:{sec:04.1f}"


def format_range(start: float | None, end: float | None, duration: float | None = None) -> str:
    """"0:47-0:53"; with ``duration`` (the file's seconds) the end shown never passes the file's end (an index
    with whole-second ranges gives a file's last range the duration rounded up)."""
    if duration is not None and end is not None and end > duration:
        end = duration
    if duration is not None and end is not None and round(end, 1) > duration:
        end = math.floor(duration * 10) / 10  # shown to a tenth, never past the end
    return f"{format_time(start)}-{format_time(end)}"


def tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal intersection over union of two ranges (seconds)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def suppress_overlaps(candidates, k: int, per_video: int | None = None, iou: float = NMS_IOU):
    """The best ``k`` ranges, each as indexed, leaving out one that overlaps a better range already taken of
    the same video with tIoU >= ``iou`` (temporal non-maximum suppression).

    ``candidates`` and the result as in :func:`merge_ranked` (each range has one row); a whole file is one
    range per file. Suppressed and ``per_video``-skipped candidates are not counted.
    """
    ranges: list[dict] = []
    by_video: dict[str, list[dict]] = {}
    for score, row, path, start, end in candidates:
        if len(ranges) >= k:
            return ranges, False
        own = by_video.setdefault(path, [])
        if start is None or end is None:
            if own:
                continue
        elif any(r["start"] is not None and tiou((start, end), (r["start"], r["end"])) >= iou for r in own):
            continue
        if per_video is not None and len(own) >= per_video:
            continue
        new = {"score": score, "path": path, "start": start, "end": end, "rows": [row]}
        own.append(new)
        ranges.append(new)
    return ranges, len(ranges) < k


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
