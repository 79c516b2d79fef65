"""Start-up checks of the video files a dataset lists: every file exists, is a regular file and is not
empty. Cheap (one ``stat`` per file), in threads for large sets, with an optional progress bar."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

PARALLEL_FROM = 512  # below this many files a plain loop is as fast


def video_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a readable video ('file not found', 'empty file (0 bytes)', ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return os.strerror(exc.errno).lower() if exc.errno else str(exc)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def find_bad_video_files(paths: Sequence[str], workers: int = 16, progress: bool = False,
                         desc: str = "checking videos") -> list[tuple[int, str]]:
    """``(index, reason)`` of every path that is not a non-empty regular file, in the order of ``paths``."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc=desc, leave=False, dynamic_ncols=True)
    problems: list[str | None] = []
    try:
        if len(paths) < PARALLEL_FROM or workers <= 1:
            for p in paths:
                problems.append(video_file_problem(p))
                if bar is not None:
                    bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for problem in pool.map(video_file_problem, paths, chunksize=64):
                    problems.append(problem)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [(i, reason) for i, reason in enumerate(problems) if reason is not None]
