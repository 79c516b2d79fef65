"""The matrices ``main.py --save_sim_matrix`` writes (:func:`save_sim_matrices`): the test similarity matrix,
the QB-norm query banks, and the extra ones for label-free QB-norm and for re-scoring a saved matrix.

``<datatype>_train_train_t2v.npy``: the query-bank texts x the query-bank videos (both from the training
split, the same rows and columns as ``_train_test_t2v.npy`` / ``_train_test_v2t.npy``), and
``<datatype>_train_train_gt.npy``: the column of each row's video (-1 when its video is not among the
columns, e.g. under --qb_norm_train_queries). With them ``search_for_best_r1_with_qb_norm.py
--beta_selection bank`` chooses beta without test labels.
``<datatype>_caption_video_index.npy``: the video of every test caption (multi-sentence test sets).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from dataloaders.frame_cache import FrameCacheUse, describe_use
from runtime.errors import first_line
from runtime.files import atomic_np_save
from runtime.logs import LOGGER_NAME
from training import distributed as D
from training.evaluation import encode_texts, encode_videos, frame_cache_counts, similarity_matrix, unwrap

log = logging.getLogger(LOGGER_NAME)

# a larger train x train matrix is not written (MSR-VTT 9k in full would be 180k captions x 9k videos)
MAX_TRAIN_TRAIN_BYTES = 4 << 30


def report_test_captions_in_bank(bank_dataset, test_dataset, limit: int = 0) -> dict | None:
    """Say (in the log) which QB-norm bank captions (the first ``limit`` training captions, all with 0) are
    test captions as the model reads them (:func:`modules.tokenizer.text_as_read`: case, spacing and
    punctuation aside): a warning naming the first pair when every test caption is in the bank (QB-norm would
    normalise each test query with itself), a note when some are. Returns dict(bank_captions,
    test_captions_in_bank, every_test_caption) or None when the datasets do not give their captions."""
    from modules.qb_norm import bank_overlap
    from modules.tokenizer import text_as_read

    bank_captions = getattr(bank_dataset, "captions", None)
    test_captions = getattr(test_dataset, "captions", None)
    tokenizer = getattr(test_dataset, "tokenizer", None)
    if bank_captions is None or test_captions is None or tokenizer is None:
        return None
    bank_captions = bank_captions[:limit] if limit else bank_captions
    max_words = int(getattr(test_dataset, "max_words", 32))
    overlap = bank_overlap([text_as_read(tokenizer, t, max_words) for t in bank_captions],
                           [text_as_read(tokenizer, t, max_words) for t in test_captions])
    found = {q for _, q in overlap["shared"]}
    if overlap["shared"]:
        b, q = overlap["shared"][0]
        bank_source = getattr(bank_dataset, "caption_sources", [f"training caption {b + 1}"] * (b + 1))[b]
        test_source = getattr(test_dataset, "caption_sources", [f"test caption {q + 1}"] * (q + 1))[q]
        pair = f"e.g. {bank_source} reads as the test caption of {test_source}"
        if overlap["every_query"]:
            log.warning("QB-norm query bank: every test caption is also a bank caption (%s); QB-norm on these "
                        "matrices normalises each test query with itself, so its scores are not a test", pair)
        else:
            log.info("QB-norm query bank: %d of %d test captions are also bank captions as the model reads them "
                     "(%s); their QB-norm scores are optimistic", len(found), len(test_captions), pair)
    return {"bank_captions": len(bank_captions), "test_captions_in_bank": len(found),
            "every_test_caption": overlap["every_query"]}


def save_caption_video_index(prefix: str, caption_video_index) -> None:
    atomic_np_save(prefix + "_caption_video_index.npy", np.asarray(caption_video_index, dtype=np.int64))


def bank_ground_truth(caption_video_index, num_texts: int, num_videos: int, left_out=()) -> np.ndarray:
    """Column of each of the first ``num_texts`` captions' video in the written matrix, or -1.

    The matrix has one column per video among the first ``num_videos`` of the dataset, less the videos in
    ``left_out`` (dataset indices, e.g. unreadable under --skip_bad_videos): a later video's column moves
    left by one for every earlier video left out, and captions of a left-out video have no column."""
    video = np.asarray(caption_video_index, dtype=np.int64)[:num_texts]
    kept = np.ones(num_videos, dtype=bool)
    kept[np.asarray(sorted(set(int(i) for i in left_out)), dtype=np.int64)] = False
    column = np.full(num_videos, -1, dtype=np.int64)
    column[kept] = np.arange(int(kept.sum()), dtype=np.int64)
    gt = np.full(video.shape, -1, dtype=np.int64)
    inside = (video >= 0) & (video < num_videos)
    gt[inside] = column[video[inside]]
    return gt


def save_train_train(prefix: str, core, bank_texts, bank_videos, bank_dataset, device, left_out=()) -> None:
    """Write the train x train matrix and its ground truth (skipped, with a message, when too large).

    ``bank_videos`` holds the encoded videos less ``left_out`` (their dataset indices)."""

    n_t, n_v = int(bank_texts.shape[0]), int(bank_videos.shape[0])
    if n_t * n_v * 4 > MAX_TRAIN_TRAIN_BYTES:
        log.info("QB-norm train x train matrix not written: %d x %d is over %d GiB; cap the bank with "
                 "--qb_norm_train_queries for --beta_selection bank", n_t, n_v, MAX_TRAIN_TRAIN_BYTES >> 30)
        return
    caption_video = getattr(bank_dataset, "caption_video_index", None)
    if caption_video is None:
        log.info("QB-norm train x train matrix not written: the bank dataset does not say which video each "
                 "caption describes")
        return
    gt = bank_ground_truth(caption_video, n_t, n_v + len(set(left_out)), left_out)
    atomic_np_save(prefix + "_train_train_t2v.npy", similarity_matrix(core, bank_texts, bank_videos, device))
    atomic_np_save(prefix + "_train_train_gt.npy", gt)
    log.info("saved %s_train_train_t2v.npy (%d x %d, %d rows with their video among the columns) and "
             "%s_train_train_gt.npy", prefix, n_t, n_v, int(np.sum(gt >= 0)), prefix)


def save_sim_matrices(args, model, res, bank_ds, tokenizer, device, precision, progress, out_dir,
                      test_ds=None) -> None:
    """<datatype>_sim_matrix.npy (test texts x test videos) and, with a training set, the QB-norm query
    banks <datatype>_train_test_t2v.npy (train texts x test videos) and <datatype>_train_test_v2t.npy
    (test texts x train videos)."""
    core = unwrap(model)
    prefix = os.path.join(out_dir, args.datatype)
    if D.is_main_process():
        atomic_np_save(prefix + "_sim_matrix.npy", res["sim"])
        save_caption_video_index(prefix, res["caption_video_index"])
        log.info("saved %s_sim_matrix.npy %s", prefix, tuple(res["sim"].shape))
    if tokenizer is not None and (bank_ds is None or getattr(bank_ds, "random_sampling", False)):
        # The training split with evaluation-style frames (segment centres).
        from dataloaders import build_test_dataset
        try:
            bank_ds = build_test_dataset(args, tokenizer, "train")
        except Exception as e:  # noqa: BLE001 - the bank is optional
            log.warning("no training set for the QB-norm query bank (%s)", first_line(e))
            bank_ds = None
    if bank_ds is None or not hasattr(bank_ds, "text_dataset"):
        log.info("QB-norm query bank not written: no training set")
        return
    texts, videos = bank_ds.text_dataset(), bank_ds.video_dataset()
    limit = args.qb_norm_train_queries
    if D.is_main_process():
        report_test_captions_in_bank(bank_ds, test_ds, limit)
    if limit:
        from torch.utils.data import Subset
        texts = Subset(texts, range(min(limit, len(texts))))
        videos = Subset(videos, range(min(limit, len(videos))))
    was = core.training
    core.eval()
    bank_t = encode_texts(core, texts, args.batch_size_val, args.num_thread_reader, device, precision, progress,
                          desc="train text (QB-norm)")
    cache_use = FrameCacheUse()
    bank_v, unreadable = encode_videos(core, videos, args.batch_size_val, args.num_thread_reader, device, precision,
                                       progress, desc="train video (QB-norm)", cache_use=cache_use)
    described = describe_use(frame_cache_counts(cache_use, device), "QB-norm query bank videos")
    if described:
        log.log(*described)
    if unreadable:  # --skip_bad_videos: left out of the bank
        keep = torch.ones(bank_v.shape[0], dtype=torch.bool)
        keep[unreadable] = False
        bank_v = bank_v[keep]
        log.warning("QB-norm query bank: %d unreadable training videos left out", len(unreadable))
    if was:
        core.train()
    if D.is_main_process():
        t2v = similarity_matrix(core, bank_t, res["video_features"], device)
        v2t = similarity_matrix(core, res["text_features"], bank_v, device)
        atomic_np_save(prefix + "_train_test_t2v.npy", t2v)
        atomic_np_save(prefix + "_train_test_v2t.npy", v2t)
        log.info("saved QB-norm query banks %s_train_test_t2v.npy %s and %s_train_test_v2t.npy %s",
                 prefix, t2v.shape, prefix, v2t.shape)
        save_train_train(prefix, core, bank_t, bank_v, bank_ds, device, left_out=unreadable)
