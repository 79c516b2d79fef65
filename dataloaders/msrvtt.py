"""MSR-VTT: train on the 9k/7k video list with captions from MSRVTT_data.json; test on 1k-A.

``--train_csv``: csv with a ``video_id`` column (MSRVTT_train.9k.csv / MSRVTT_train.7k.csv).
``--data_path``: MSRVTT_data.json, or the folder holding it (``{"sentences": [{"video_id", "caption"}]}``).
``--val_csv``: MSRVTT_JSFUSION_test.csv (``key,vid_key,video_id,sentence``): caption i <-> video i.
``--features_path``: folder with ``<video_id>.mp4``.
With ``--expand_msrvtt_sentences`` every caption of a train video is one sample; otherwise a train
sample is a video with one of its captions drawn at random at every access (once per epoch).
"""
from __future__ import annotations

import csv
import io
import json
import os

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, get_option, read_text, \
    require_columns, require_file


def read_csv_rows(path: str, needed: list[str]) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path, "csv file"), newline=""))
    require_columns(path, reader.fieldnames or [], needed)
    rows = list(reader)
    if not rows:
        raise AnnotationError(f"{path}: no rows after the header (the file lists no videos)")
    for i, row in enumerate(rows):
        empty = [c for c in needed if not (row.get(c) or "").strip()]
        if empty:
            raise AnnotationError(f"{path} line {i + 2}: empty value in column(s) {empty}")
    return rows


class MSRVTTDataset(VideoTextDataset):
    name = "msrvtt"

    def __init__(self, args, tokenizer, split: str, eval_sampling: bool = False):
        self.expand_sentences = bool(get_option(args, "expand_msrvtt_sentences", False))
        super().__init__(args, tokenizer, split, eval_sampling)

    def _entry(self, video_id: str, source: str) -> VideoEntry:
        return VideoEntry(video_id, self.video_path(video_id, os.path.join(self.features_path, video_id + ".mp4")),
                          source)

    def load_annotations(self) -> Annotations:
        return self._load_train() if self.train else self._load_test()

    def _load_test(self) -> Annotations:
        path = get_option(self.args, "val_csv", "")
        rows = read_csv_rows(path, ["video_id", "sentence"])
        name = os.path.basename(path)
        video_index: dict[str, int] = {}
        videos, captions, links, sources = [], [], [], []
        for i, row in enumerate(rows):
            vid = row["video_id"].strip()
            if vid not in video_index:
                video_index[vid] = len(videos)
                videos.append(self._entry(vid, f"{name} line {i + 2}"))
            captions.append(row["sentence"])
            links.append(video_index[vid])
            sources.append(f"{name} line {i + 2}")
        return Annotations(videos, captions, links, sources)

    def _json_path(self) -> str:
        path = self.data_path
        if os.path.isdir(path):
            path = os.path.join(path, "MSRVTT_data.json")
        return require_file(path, "MSRVTT_data.json (--data_path)")

    def _load_train(self) -> Annotations:
        csv_path = get_option(self.args, "train_csv", "")
        ids = [r["video_id"].strip() for r in read_csv_rows(csv_path, ["video_id"])]
        json_path = self._json_path()
        try:
            data = json.loads(read_text(json_path))
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{json_path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
            raise AnnotationError(f"{json_path}: expected an object with a 'sentences' list")
        name = os.path.basename(csv_path)
        video_index: dict[str, int] = {}
        videos = []
        for i, vid in enumerate(ids):
            if vid not in video_index:
                video_index[vid] = len(videos)
                videos.append(self._entry(vid, f"{name} line {i + 2}"))
        captions, links, sources = [], [], []
        jname = os.path.basename(json_path)
        for k, item in enumerate(data["sentences"]):
            if not isinstance(item, dict) or "video_id" not in item or "caption" not in item:
                raise AnnotationError(f"{json_path}: sentences[{k}] lacks 'video_id' or 'caption'")
            v = video_index.get(item["video_id"])
            if v is None:
                continue
            captions.append(item["caption"])
            links.append(v)
            sources.append(f"{jname} sentences[{k}]")
        captioned = set(links)
        without = [v.video_id for i, v in enumerate(videos) if i not in captioned]
        if without:
            raise AnnotationError(f"{csv_path}: {len(without)} video ids have no caption in {json_path} "
                                  f"(unknown ids, e.g. {without[:5]})")
        return Annotations(videos, captions, links, sources)

    @property
    def sample_per_video(self) -> bool:  # type: ignore[override]
        return self.train and not self.expand_sentences
