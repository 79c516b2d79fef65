"""MSVD: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` and ``raw-captions.pkl`` (or
``raw-captions.json``): ``{video_id: [[token, ...], ...]}`` (captions as token lists, joined with
spaces) or ``{video_id: [caption, ...]}``, in ``--data_path``; videos ``<video_id>.<ext>`` under
``--features_path``. Several captions per video."""
from __future__ import annotations

import os
import pickle

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, read_lines
from .vatex import captions_per_video, load_json


class MSVDDataset(VideoTextDataset):
    name = "msvd"
    list_files = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}

    def _captions(self) -> tuple[dict, str]:
        pkl = os.path.join(self.data_path, "raw-captions.pkl")
        js = os.path.join(self.data_path, "raw-captions.json")
        if os.path.isfile(pkl):
            try:
                with open(pkl, "rb") as f:
                    data = pickle.load(f)
            except Exception as exc:
                raise AnnotationError(f"{pkl}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
            path = pkl
        elif os.path.isfile(js):
            data, path = load_json(js), js
        else:
            raise AnnotationError(f"MSVD captions not found: neither {pkl} nor {js}")
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: expected a dict {{video_id: [captions]}}")
        return data, path

    def load_annotations(self) -> Annotations:
        list_path = os.path.join(self.data_path, self.list_files[self.split])
        ids = list(dict.fromkeys(read_lines(list_path)))
        captions, caption_file = self._captions()

        def entry(vid, source):
            return VideoEntry(vid, self.video_path(vid, os.path.join(self.features_path, vid + ".avi"),
                                                   os.path.join(self.features_path, vid + ".mp4")), source)

        return captions_per_video(ids, list_path, captions, caption_file, entry)
