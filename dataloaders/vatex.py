"""VATEX: ``train_list.txt`` / ``test_list.txt`` (one video id per line; val uses the test list, as
published) and ``ref_captions.json`` (``{video_id: [caption, ...]}``) in ``--data_path``; videos
``<video_id>.<ext>`` anywhere under ``--features_path``. Several captions per video."""
from __future__ import annotations

import json
import os

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, read_lines, read_text


def load_json(path: str):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc


def captions_per_video(ids: list[str], list_name: str, captions: dict, caption_file: str,
                       entry) -> Annotations:
    """Annotations for id lists with a ``{video_id: [caption, ...]}`` caption table."""
    unknown = [v for v in ids if v not in captions]
    if unknown:
        raise AnnotationError(f"{list_name}: {len(unknown)} video ids have no captions in {caption_file} "
                              f"(unknown ids, e.g. {unknown[:5]})")
    videos, texts, links, sources = [], [], [], []
    for line, vid in enumerate(ids):
        caps = captions[vid]
        if isinstance(caps, str) or not isinstance(caps, list) or not caps:
            raise AnnotationError(f"{caption_file}: captions of {vid!r} must be a non-empty list")
        videos.append(entry(vid, f"{os.path.basename(list_name)} line {line + 1}"))
        for k, cap in enumerate(caps):
            texts.append(cap if isinstance(cap, str) else " ".join(cap))
            links.append(len(videos) - 1)
            sources.append(f"{os.path.basename(caption_file)} [{vid!r}][{k}]")
    return Annotations(videos, texts, links, sources)


class VATEXDataset(VideoTextDataset):
    name = "vatex"
    list_files = {"train": "train_list.txt", "val": "test_list.txt", "test": "test_list.txt"}

    def load_annotations(self) -> Annotations:
        list_path = os.path.join(self.data_path, self.list_files[self.split])
        ids = list(dict.fromkeys(read_lines(list_path)))
        caption_file = os.path.join(self.data_path, "ref_captions.json")
        captions = load_json(caption_file)
        if not isinstance(captions, dict):
            raise AnnotationError(f"{caption_file}: expected an object {{video_id: [captions]}}")

        def entry(vid, source):
            return VideoEntry(vid, self.video_path(vid, os.path.join(self.features_path, vid + ".mp4")), source)

        return captions_per_video(ids, list_path, captions, caption_file, entry)
