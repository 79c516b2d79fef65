"""DiDeMo, paragraph retrieval: ``{train,val,test}_list.txt`` (video file names) and
``{train,val,test}_data.json`` (a list of ``{"video", "description", "times"}``) in ``--data_path``;
the descriptions of a video are joined into one paragraph and the first 31 s are used, as published.
Videos named ``<video>`` or ``<video>.mp4`` (or the name with its extension replaced by .mp4) under
``--features_path``. Listed videos without description are reported in the log and left out."""
from __future__ import annotations

import logging
import os

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, read_lines
from .vatex import load_json

logger = logging.getLogger(__name__)


class DiDeMoDataset(VideoTextDataset):
    name = "didemo"

    def load_annotations(self) -> Annotations:
        list_path = os.path.join(self.data_path, f"{self.split}_list.txt")
        data_path = os.path.join(self.data_path, f"{self.split}_data.json")
        ids = list(dict.fromkeys(read_lines(list_path)))
        data = load_json(data_path)
        if not isinstance(data, list):
            raise AnnotationError(f"{data_path}: expected a list of {{video, description, times}}")
        descriptions: dict[str, list[str]] = {}
        for k, item in enumerate(data):
            if not isinstance(item, dict) or "video" not in item or "description" not in item:
                raise AnnotationError(f"{data_path}: item {k} lacks 'video' or 'description'")
            descriptions.setdefault(item["video"], []).append(item["description"])
        self.ids_without_annotation = [v for v in ids if v not in descriptions]
        if self.ids_without_annotation:
            logger.warning("didemo %s: %d listed videos have no description and are left out: %s", self.split,
                           len(self.ids_without_annotation), ", ".join(self.ids_without_annotation[:20]))
        videos, paragraphs, sources = [], [], []
        for line, vid in enumerate(ids):
            if vid not in descriptions:
                continue
            stem = os.path.splitext(vid)[0]
            path = self.video_path(vid, os.path.join(self.features_path, vid),
                                   os.path.join(self.features_path, vid + ".mp4"),
                                   os.path.join(self.features_path, stem + ".mp4"))
            videos.append(VideoEntry(vid, path, f"{os.path.basename(list_path)} line {line + 1}", 0.0, 31.0))
            paragraphs.append(" ".join(descriptions[vid]))
            sources.append(f"{os.path.basename(data_path)} [{vid!r}]")
        return Annotations(videos, paragraphs, list(range(len(videos))), sources)
