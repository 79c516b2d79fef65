"""ActivityNet Captions, paragraph retrieval: ``train_ids.json`` / ``val_ids.json`` (lists of
``v_<youtube id>``) and ``train.json`` / ``val_1.json`` (``{id: {duration, timestamps, sentences}}``)
in ``--data_path``; a video's sentences are joined into one paragraph. Videos ``<youtube id>.mp4``
(or ``v_<youtube id>.mp4``) under ``--features_path``. Ids of the list without annotation are
reported in the log and left out."""
from __future__ import annotations

import logging
import math
import os

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset
from .vatex import load_json

logger = logging.getLogger(__name__)


class ActivityNetDataset(VideoTextDataset):
    name = "activity"
    files = {"train": ("train_ids.json", "train.json"), "val": ("val_ids.json", "val_1.json"),
             "test": ("val_ids.json", "val_1.json")}

    def load_annotations(self) -> Annotations:
        id_file, ann_file = (os.path.join(self.data_path, f) for f in self.files[self.split])
        ids = load_json(id_file)
        data = load_json(ann_file)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise AnnotationError(f"{id_file}: expected a list of video ids")
        if not isinstance(data, dict):
            raise AnnotationError(f"{ann_file}: expected an object {{video_id: {{duration, sentences}}}}")
        ids = list(dict.fromkeys(ids))
        self.ids_without_annotation = [v for v in ids if v not in data]
        if self.ids_without_annotation:
            logger.warning("activity %s: %d of %d ids in %s have no annotation in %s and are left out: %s",
                           self.split, len(self.ids_without_annotation), len(ids), os.path.basename(id_file),
                           os.path.basename(ann_file), ", ".join(self.ids_without_annotation))
        videos, paragraphs, sources = [], [], []
        for line, vid in enumerate(ids):
            if vid not in data:
                continue
            item = data[vid]
            if not isinstance(item, dict) or not isinstance(item.get("sentences"), list) or "duration" not in item:
                raise AnnotationError(f"{ann_file}: entry {vid!r} lacks 'sentences' or 'duration'")
            yid = vid[2:] if vid.startswith("v_") else vid
            path = self.video_path(yid, os.path.join(self.features_path, yid + ".mp4"),
                                   os.path.join(self.features_path, vid + ".mp4"))
            # the published loader cuts [0, ceil(duration)] seconds
            videos.append(VideoEntry(vid, path, f"{os.path.basename(id_file)} [{line}]", 0.0,
                                     float(math.ceil(float(item["duration"])))))
            paragraphs.append(" ".join(item["sentences"]))
            sources.append(f"{os.path.basename(ann_file)} [{vid!r}]")
        return Annotations(videos, paragraphs, list(range(len(videos))), sources)
