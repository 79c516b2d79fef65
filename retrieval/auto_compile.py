"""``search_videos.py index --compile auto``: whether compiling the video encoder pays for this run.

Compiling costs a fixed time per process (runtime.compilation: minutes from an empty compile cache,
seconds from a warm one) and saves a fixed share of every batch, so it pays from a number of ranges on
(runtime.compilation.INDEX_AUTO_MIN_RANGES, measured). The run's ranges are counted before the index
plans them: a file of a whole-file index is one range; a file cut into ranges is probed for its length
(windows: counted exactly; shots: at least one per ``--max_len`` seconds, so the count is a lower bound
and a doubtful run stays eager). Probing stops as soon as the count is enough.
"""
from __future__ import annotations

import dataclasses
import math
import os

from retrieval.segments import Segmentation, window_ranges, with_scales


def ranges_of_file(seg: Segmentation, duration: float | None) -> int:
    """The ranges ``seg`` cuts a file of ``duration`` seconds into (shots: the fewest it can be)."""
    return _ranges(seg, duration)[0]


def _ranges(seg: Segmentation, duration: float | None) -> tuple[int, bool]:
    """(ranges, exact) of one file."""
    mode = seg.mode
    if mode == "auto":
        mode = "whole" if duration is None or duration <= seg.whole_up_to else "shots"
    if mode == "whole" or duration is None:
        return 1, mode == "whole"
    if mode == "windows":
        windows = {r for j in range(1, seg.scales + 1) for r in window_ranges(duration, j * seg.window, seg.stride)}
        return len(windows), True
    shots = max(1, math.ceil(duration / seg.max_len))  # merged and split to at most max_len seconds each
    return len(with_scales([(i, i + 1) for i in range(shots)], seg.scales)), False


def count_ranges(files: list[str], seg: Segmentation, decoder: str, enough: int) -> tuple[int, bool]:
    """(ranges, estimated): the ranges of ``files``, counted until ``enough``; ``estimated``: the count is a
    lower bound (shots, or files beyond ``enough`` counted as one range each)."""
    if seg.mode == "whole" or len(files) >= enough:  # at least one range per file
        return len(files), seg.mode != "whole"
    from retrieval.encode import probe_duration

    total, exact = 0, True
    for done, path in enumerate(files, 1):
        try:
            duration = probe_duration(path, decoder)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the index run itself
            duration = None
        ranges, exact_here = _ranges(seg, duration)
        total, exact = total + ranges, exact and exact_here
        if total >= enough:
            return total + len(files) - done, not (exact and done == len(files))
    return total, not exact


def index_shape_key(model, device, batch_size: int, dtype) -> str:
    """The compile cache key of the index's video encoder at this batch shape (runtime.compilation)."""
    from runtime.compilation import shape_key

    return shape_key(use="index video encoder", clip=dataclasses.asdict(model.clip.config),
                     dgl=dataclasses.asdict(model.config), batch=batch_size, dtype=str(dtype), device=device.type)


def files_to_encode(videos: list[str], index_dir: str) -> list[str]:
    """The video files under ``videos`` that the index does not hold yet (by path)."""
    from retrieval.encode import find_videos

    files = find_videos(videos, exclude=index_dir)
    if not os.path.isfile(os.path.join(index_dir, "index.json")):
        return files
    from retrieval.index import VideoIndex

    try:
        held = {e["path"] for e in VideoIndex.open(index_dir).entries}
    except Exception:  # noqa: BLE001 - an empty or damaged index: everything is to do (the run reports it)
        return files
    return [f for f in files if f not in held]


def decide(videos: list[str], index_dir: str, seg: Segmentation, decoder: str, processes: int, warm: bool
           ) -> tuple[bool, str]:
    """(compile?, one log line) for an index run of ``processes`` processes over ``videos``."""
    from runtime.compilation import INDEX_AUTO_MIN_RANGES, INDEX_AUTO_MIN_RANGES_WARM, auto_compile_index

    needed = INDEX_AUTO_MIN_RANGES_WARM if warm else INDEX_AUTO_MIN_RANGES
    total, estimated = count_ranges(files_to_encode(videos, index_dir), seg, decoder, needed * processes)
    return auto_compile_index(math.ceil(total / processes), warm, estimated)
