"""Start-up check of the videos a run will read: every file exists and is not empty.

Without --skip_bad_videos a bad file stops the run in one line (count, first files and their annotation
rows) before any training; with it the bad videos and their captions are left out and counted.
"""
from __future__ import annotations

import logging

from runtime.errors import fail

log = logging.getLogger("dgl")

SHOWN = 3  # files named in the one-line error


def leave_out_bad_video_files(dataset, split: str, skip: bool, progress: bool) -> dict | None:
    """Check the video files of ``dataset`` (a VideoTextDataset; others are not checked). Returns a record
    of what was left out (None when nothing was), or stops the run."""
    from dataloaders.base import VideoTextDataset
    from dataloaders.checks import find_bad_video_files

    if not isinstance(dataset, VideoTextDataset):
        return None
    videos = dataset.videos
    bad = find_bad_video_files([v.path for v in videos], progress=progress, desc=f"checking {split} videos")
    if not bad:
        log.info("%s videos: all %d files present and non-empty", split, len(videos))
        return None
    described = [f"{videos[i].path} ({videos[i].source}: {reason})" for i, reason in bad]
    if not skip or len(bad) == len(videos):
        advice = "check --features_path" if len(bad) == len(videos) else "pass --skip_bad_videos to leave them out"
        fail(f"{len(bad)} of {len(videos)} {split} videos are missing or empty: {'; '.join(described[:SHOWN])}"
             f"{'; ...' if len(bad) > SHOWN else ''} (fix the files, or {advice})")
    for line in described:
        log.warning("%s video left out (--skip_bad_videos): %s", split, line)
    captions = dataset.leave_out_videos(i for i, _ in bad)
    record = {"videos": len(bad), "captions": captions, "of_videos": len(videos),
              "files": [videos[i].path for i, _ in bad[:100]]}
    if split == "train":
        log.warning("training set: %d of %d videos are missing or empty and were left out with their %d captions "
                    "(--skip_bad_videos)", len(bad), len(videos), captions)
    else:
        record["comparable_to_full_test_set"] = False
        log.warning("test set: %d of %d videos are missing or empty and were left out with their %d captions "
                    "(--skip_bad_videos): the metrics are NOT comparable to those on the full test set",
                    len(bad), len(videos), captions)
    return record
