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


def check_spans(dataset, split: str, skip: bool, clip_to_video: bool) -> dict | None:
    """--datatype custom: every start/end span lies in its video (read from each file's header). A span that
    ends more than one frame past the end of its video stops the run in one line naming the file and the
    row, or with ``clip_to_video`` is cut at the end of the video; a span that starts past the end is
    always an error. A file that cannot be opened is a bad video (left out with ``skip``)."""
    import dataclasses

    from dataloaders.video import VideoDecodeError, open_video

    videos = getattr(dataset, "videos", None) or []
    spans = [i for i, v in enumerate(videos) if v.start is not None and v.end is not None]
    if not spans:
        return None
    lengths: dict[str, tuple[float, float] | str] = {}
    for i in spans:
        path = videos[i].path
        if path in lengths:
            continue
        try:
            reader = open_video(path)
            lengths[path] = (float(len(reader)), float(reader.get_avg_fps()))
            del reader
        except VideoDecodeError as exc:
            lengths[path] = exc.reason
    unreadable, clipped = [], 0
    for i in spans:
        entry = videos[i]
        known = lengths[entry.path]
        if isinstance(known, str):
            unreadable.append((i, known))
            continue
        frames, fps = known
        if fps <= 0:
            unreadable.append((i, "the file does not give its frame rate, so a span cannot be cut"))
            continue
        duration = frames / fps
        if entry.start >= duration:
            fail(f"{entry.source} column 'start': the span {entry.start:g}-{entry.end:g} s starts past the end of "
                 f"{entry.path} ({duration:.2f} s)")
        if entry.end > duration + 1.0 / fps:
            if not clip_to_video:
                fail(f"{entry.source} column 'end': the span {entry.start:g}-{entry.end:g} s ends past the end of "
                     f"{entry.path} ({duration:.2f} s); fix the row, or pass --clip_spans_to_video to cut it "
                     "at the end of the video")
            videos[i] = dataclasses.replace(entry, end=duration)
            clipped += 1
    if clipped:
        log.warning("%s: %d span(s) ending past the end of their video were cut at its end (--clip_spans_to_video)",
                    split, clipped)
    if not unreadable:
        return None
    described = [f"{videos[i].path} ({videos[i].source}: {reason})" for i, reason in unreadable]
    if not skip or len(unreadable) == len(videos):
        fail(f"{len(unreadable)} {split} video(s) cannot be read: {'; '.join(described[:SHOWN])}"
             f"{'; ...' if len(unreadable) > SHOWN else ''} (fix the files, or pass --skip_bad_videos to leave "
             "them out)")
    for line in described:
        log.warning("%s video left out (--skip_bad_videos): %s", split, line)
    captions = dataset.leave_out_videos(i for i, _ in unreadable)
    return {"videos": len(unreadable), "captions": captions, "of_videos": len(videos),
            "files": [videos[i].path for i, _ in unreadable[:100]]}


def warn_test_videos_in_training(args, train_dataset, test_dataset) -> int:
    """--datatype custom: count (and warn about) test video files that the training file also uses."""
    from dataloaders.custom import files_in_both, read_annotation_rows

    test_rows = getattr(test_dataset, "rows", None)
    train_file = getattr(args, "train_csv", None)
    if test_rows is None or not train_file:
        return 0
    train_rows = getattr(train_dataset, "rows", None)
    if train_rows is None:
        try:
            train_rows = read_annotation_rows(train_file, getattr(args, "features_path", "") or "", "--train_csv")
        except ValueError:
            return 0  # an evaluation does not read the training file otherwise
    shared = files_in_both(train_rows, test_rows)
    if shared:
        test_files = len({r.file for r in test_rows})
        log.warning("%d of %d test video files also appear in the training file %s (e.g. %s): the test is not "
                    "video-disjoint (python -m preprocess.split_annotations writes a disjoint split)",
                    len(shared), test_files, train_file, shared[0])
    return len(shared)


def check_run_data(args, train_dataset, test_dataset, progress: bool) -> tuple[dict, int]:
    """The start-up checks of a main.py run: the video files of the test split (and the training split when
    training), the spans of custom tables, test videos shared with the training file. Returns (the videos
    and captions left out per split, the number of test video files the training file also uses)."""
    left_out: dict = {}
    checks = [("test", test_dataset)] + ([("train", train_dataset)] if args.do_train else [])
    for split, dataset in checks:
        record = leave_out_bad_video_files(dataset, split, bool(args.skip_bad_videos), progress)
        if record:
            left_out[split] = record
        if args.datatype == "custom":
            record = check_spans(dataset, split, bool(args.skip_bad_videos),
                                 bool(getattr(args, "clip_spans_to_video", 0)))
            if record:
                left_out[split] = _merge_left_out(left_out.get(split), record)
    shared = warn_test_videos_in_training(args, train_dataset, test_dataset) if args.datatype == "custom" else 0
    return left_out, shared


def _merge_left_out(first: dict | None, second: dict) -> dict:
    """Two records of videos left out of one split (missing files, then unreadable ones)."""
    if not first:
        return second
    merged = dict(first)
    merged["videos"] = first["videos"] + second["videos"]
    merged["captions"] = first["captions"] + second["captions"]
    merged["files"] = (first.get("files", []) + second.get("files", []))[:100]
    return merged
