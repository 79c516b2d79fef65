"""Video-text datasets of DGL: a registry and the two builders the training code calls.

``args`` is an argparse.Namespace with the published flag names (data_path, features_path, train_csv,
val_csv, max_words, max_frames, feature_framerate, expand_msrvtt_sentences, slice_framepos,
train_frame_order, eval_frame_order) plus ``image_resolution`` and ``skip_bad_videos``; the dataset
is chosen by ``args.datatype`` (the published flag; default ``msrvtt``).

A new dataset is a :class:`~dataloaders.base.VideoTextDataset` subclass implementing
``load_annotations`` plus one entry in :data:`DATASETS`.
"""
from __future__ import annotations

from .activitynet import ActivityNetDataset
from .base import (AnnotationError, BadVideoError, ReplacementCounter, VideoTextDataset)
from .custom import CustomDataset
from .didemo import DiDeMoDataset
from .lsmdc import LSMDCDataset
from .msrvtt import MSRVTTDataset
from .msvd import MSVDDataset
from .vatex import VATEXDataset
from .video import VideoDecodeError

DATASETS = {
    "msrvtt": MSRVTTDataset,
    "vatex": VATEXDataset,
    "lsmdc": LSMDCDataset,
    "activity": ActivityNetDataset,
    "msvd": MSVDDataset,
    "didemo": DiDeMoDataset,
    "custom": CustomDataset,
}


def _dataset_class(args):
    name = getattr(args, "datatype", None) or "msrvtt"
    if name not in DATASETS:
        raise ValueError(f"unknown --datatype {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def build_train_dataset(args, tokenizer) -> VideoTextDataset:
    """The training dataset of ``args.datatype``: samples dict(input_ids, video, video_mask, index, replaced)."""
    return _dataset_class(args)(args, tokenizer, "train")


def build_test_dataset(args, tokenizer, split: str = "test") -> VideoTextDataset:
    """An evaluation dataset: ``.num_videos``, ``.num_captions``, ``.caption_video_index``,
    ``.text_dataset()``, ``.video_dataset()``. ``split`` is 'test' or 'val', or 'train' for the training
    split sampled like an evaluation set (segment-centre frames), as the QB-norm query bank needs."""
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be 'test', 'val' or 'train', got {split!r}")
    return _dataset_class(args)(args, tokenizer, split, eval_sampling=True)


__all__ = ["DATASETS", "build_train_dataset", "build_test_dataset", "VideoTextDataset", "AnnotationError",
           "BadVideoError", "VideoDecodeError", "ReplacementCounter"]
