"""LSMDC: tab-separated ``<clip_id> <start_aligned> <end_aligned> <start_extracted> <end_extracted>
<sentence>`` files in ``--data_path`` (LSMDC16_annos_training.csv, LSMDC16_annos_val.csv,
LSMDC16_challenge_1000_publictect.csv). A clip ``1004_Juno_00.00.32.849-00.00.35.458`` lives in the
movie folder ``<features_path>/1004_Juno/`` (or where ``<data_path>/video_path.json`` says)."""
from __future__ import annotations

import json
import os
import re

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, read_text, require_file

_CLIP_TIME = re.compile(r"_\d{2}\.\d{2}\.\d{2}\.\d+-\d{2}\.\d{2}\.\d{2}\.\d+$")


def movie_of_clip(clip_id: str) -> str:
    """``'1004_Juno_00.00.32.849-00.00.35.458'`` -> ``'1004_Juno'``."""
    movie = _CLIP_TIME.sub("", clip_id)
    return movie if movie != clip_id else clip_id.rsplit("_", 1)[0]


class LSMDCDataset(VideoTextDataset):
    name = "lsmdc"
    csv_files = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
                 "test": "LSMDC16_challenge_1000_publictect.csv"}

    def load_annotations(self) -> Annotations:
        path = require_file(os.path.join(self.data_path, self.csv_files[self.split]))
        name = os.path.basename(path)
        mapping = {}
        map_file = os.path.join(self.data_path, "video_path.json")
        if os.path.isfile(map_file):
            try:
                mapping = json.loads(read_text(map_file))
            except json.JSONDecodeError as exc:
                raise AnnotationError(f"{map_file}: not valid JSON ({exc})") from exc
        video_index: dict[str, int] = {}
        videos, captions, links, sources = [], [], [], []
        for line_no, line in enumerate(read_text(path).split("\n"), start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 6:
                raise AnnotationError(f"{path} line {line_no}: expected 6 tab-separated columns (clip id, "
                                      f"4 times, sentence), found {len(fields)}")
            clip_id, sentence = fields[0].strip(), fields[5].strip()
            if not clip_id or not sentence:
                raise AnnotationError(f"{path} line {line_no}: empty clip id or sentence")
            if clip_id not in video_index:
                video_index[clip_id] = len(videos)
                folder = os.path.join(self.features_path, movie_of_clip(clip_id))
                candidates = [os.path.join(self.features_path, mapping[clip_id])] if clip_id in mapping else []
                candidates += [os.path.join(folder, clip_id + ext) for ext in (".avi", ".mp4")]
                videos.append(VideoEntry(clip_id, self.video_path(clip_id, *candidates), f"{name} line {line_no}"))
            captions.append(sentence)
            links.append(video_index[clip_id])
            sources.append(f"{name} line {line_no}")
        if not videos:
            raise AnnotationError(f"{path}: no rows (the file lists no clips)")
        return Annotations(videos, captions, links, sources)
