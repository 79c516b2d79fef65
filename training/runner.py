"""What main.py runs: build everything from the flags, train / evaluate, checkpoint, log.

``run(args, model=..., train_dataset=..., test_dataset=...)`` accepts ready-made pieces so that the
tests can drive the same loop with tiny models and in-memory datasets.
"""
from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from training import distributed as D
from training.checkpoint import (atomic_np_save, atomic_torch_save, is_own_checkpoint, load_checkpoint_file,
                                 make_checkpoint, rng_state, set_rng_state)
from training.config import config_to_json, fail, resolve_clip_path
from training.cpu import apply_cpu_settings, restore as restore_cpu_settings
from training.engine import Precision, evaluate, log_eval, train_one_epoch, unwrap
from training.logs import Board, close_logging, setup_logging, write_results
from training.optim import WarmupCosineSchedule, build_optimizer, total_optimization_steps

log = logging.getLogger("dgl")

CKPT = "ckpt.pth.tar"
CKPT_BEST = "ckpt.best.pth.tar"
DGL_FIELDS = ("shared_latent_space", "max_words", "max_frames", "text_prompt_length",
              "local_each_frame_prompt_length", "global_visual_prompt_length", "unified_transformer_layers",
              "visual_output_type")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ building
def build_model_and_tokenizer(args):
    from modules.dgl import DGL
    from modules.tokenizer import get_tokenizer

    clip_path = resolve_clip_path(args)
    try:
        tokenizer = get_tokenizer(bpe_path=args.bpe_path, pretrained_dir=args.pretrained_dir)
    except FileNotFoundError as e:
        fail(str(e).splitlines()[0] if str(e) else "CLIP's BPE vocabulary not found; pass --bpe_path")
    try:
        model = DGL.from_pretrained(clip_path, mask_padding_frames=bool(args.mask_padding_frames),
                                    **{k: getattr(args, k) for k in DGL_FIELDS})
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        fail(f"cannot build DGL on {clip_path}: {str(e).splitlines()[0]}")
    vocab = model.clip.config.vocab_size
    if getattr(tokenizer, "vocab_size", vocab) > vocab:
        fail(f"the BPE vocabulary has {tokenizer.vocab_size} tokens but the CLIP in {clip_path} embeds only "
             f"{vocab}; use the vocabulary the CLIP was trained with (--bpe_path)")
    return model, tokenizer, clip_path


def build_datasets(args, tokenizer, need_train: bool):
    from dataloaders import build_test_dataset, build_train_dataset

    train_ds = test_ds = None
    try:
        if need_train:
            train_ds = build_train_dataset(args, tokenizer)
        test_ds = build_test_dataset(args, tokenizer, "test")
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        fail(f"cannot load the {args.datatype} data: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return train_ds, test_ds


# ------------------------------------------------------------------------------------------ main loop
def run(args, *, model=None, tokenizer=None, train_dataset=None, test_dataset=None, bank_dataset=None) -> dict:
    t_start = time.time()
    info = D.setup(args.device, args.dist_backend, args.gpu)
    device = info.device
    out_dir = args.output_dir
    if model is None:  # before any logging: a bad CLIP / vocabulary path is reported as one line
        seed_all(args.seed)
        model, tokenizer, clip_path = build_model_and_tokenizer(args)
        args.clip_path = clip_path
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    D.barrier()
    setup_logging(out_dir, info.is_main, info.rank, args.debug)
    progress = info.is_main and not args.no_progress
    try:
        return _run(args, info, device, out_dir, progress, t_start, model, tokenizer, train_dataset,
                    test_dataset, bank_dataset)
    finally:
        restore_cpu_settings()
        close_logging()


def _run(args, info, device, out_dir, progress, t_start, model, tokenizer, train_ds, test_ds, bank_ds):
    if info.distributed:
        log.info("distributed: %d processes (%s), this is rank %d on %s", info.world_size, info.backend,
                 info.rank, device)
    else:
        log.info("single process on %s", device)
    precision = Precision(args.precision, device, getattr(args, "eval_precision", None))
    if precision.note:
        log.warning(precision.note)
    apply_cpu_settings(args, device, model, precision)

    if getattr(args, "clip_path", None):
        log.info("CLIP weights: %s", args.clip_path)
    args.image_resolution = int(model.image_resolution)
    if train_ds is None and test_ds is None:
        train_ds, test_ds = build_datasets(args, tokenizer, need_train=bool(args.do_train))
    if args.do_train and train_ds is None:
        fail("training needs a training set")

    model.to(device)
    core = model
    n_train = sum(p.numel() for _, p in core.trainable_parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in core.parameters())
    log.info("trainable parameters: %d (%.2fM) of %d (%.2f%%)", n_train, n_train / 1e6, n_all,
             100.0 * n_train / max(n_all, 1))
    for name, p in core.trainable_parameters():
        log.debug("  trainable %s %s", name, tuple(p.shape))

    if info.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        # the postfix text prompts never get a gradient (published quirk), hence find_unused_parameters
        model = torch.nn.parallel.DistributedDataParallel(core, find_unused_parameters=True, **ddp_kwargs)

    micro_batch = args.batch_size // args.gradient_accumulation_steps
    loader = sampler = None
    if args.do_train:
        sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
        loader = DataLoader(train_ds, batch_size=micro_batch, sampler=sampler, drop_last=True,
                            num_workers=args.num_thread_reader, pin_memory=device.type == "cuda")
        if len(loader) < args.gradient_accumulation_steps:
            fail(f"the training set ({len(train_ds)} samples) is smaller than one global batch "
                 f"({args.batch_size} x {info.world_size} processes); lower --batch_size")
    batches = len(loader) if loader is not None else 1
    total_steps = total_optimization_steps(batches, args.gradient_accumulation_steps, args.epochs)
    optimizer = build_optimizer(core.trainable_parameters(), args.lr, args.wd, args.coef_lr,
                                (args.beta1, args.beta2), args.eps)
    schedule = WarmupCosineSchedule(args.lr, total_steps, args.warmup_proportion, args.wd)
    scaler = precision.make_scaler()

    start_epoch, global_step, best_r1, best_epoch = 0, 0, float("-inf"), None
    results = {"evaluations": [], "best": None}
    if args.resume:
        try:
            ckpt = load_checkpoint_file(args.resume)
        except Exception as e:  # noqa: BLE001 - one line, not a traceback
            fail(f"cannot read --resume {args.resume}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        try:
            core.load_checkpoint(ckpt)
        except (ValueError, KeyError, RuntimeError) as e:
            fail(f"cannot load --resume {args.resume}: {str(e).splitlines()[0]}")
        own = is_own_checkpoint(ckpt)
        log.info("[resume] loaded weights from %s (%s checkpoint, epoch %s, step %s)", args.resume,
                 "our" if own else "official", ckpt.get("epoch"), ckpt.get("global_step"))
        if not args.load_from_pretrained:
            start_epoch = int(ckpt.get("epoch", 0) or 0)
            global_step = int(ckpt.get("global_step", 0) or 0)
            if ckpt.get("best_acc1") is not None and own:
                best_r1 = float(ckpt["best_acc1"])
                best_epoch = ckpt.get("best_epoch")
            if args.do_train and ckpt.get("optimizer"):
                try:
                    optimizer.load_state_dict(ckpt["optimizer"])
                except (ValueError, KeyError) as e:
                    log.warning("[resume] optimiser state not loaded (%s); AdamW moments start from zero", e)
            if args.do_train and scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if own:
                if args.do_train:  # the run continues: keep its evaluation history
                    results = ckpt.get("results") or results
                set_rng_state(ckpt.get("rng"))
                old_total = ckpt.get("schedule", {}).get("total_steps")
                if args.do_train and old_total is not None and abs(old_total - total_steps) > 1e-6:
                    log.warning("[resume] the schedule length changed (%s -> %s optimiser steps): --epochs, "
                                "--batch_size or the process count differ from the interrupted run",
                                old_total, total_steps)
        if args.do_train and start_epoch >= args.epochs:
            log.info("[resume] the checkpoint already completed %d of %d epochs", start_epoch, args.epochs)

    board = Board(os.path.join(out_dir, "tensorboard")) if info.is_main and not args.no_tensorboard else None
    if info.is_main:
        config_to_json(args, os.path.join(out_dir, "config.json"))
        log.info("configuration saved to %s", os.path.join(out_dir, "config.json"))

    def record(res, tag, epoch, train_stats=None):
        entry = {"tag": tag, "epoch": epoch, "global_step": global_step, "t2v": res["t2v"], "v2t": res["v2t"],
                 "num_captions": res["num_captions"], "num_videos": res["num_videos"],
                 "multi_sentence": bool(res.get("multi_sentence")), "eval_time": round(res["time"], 3)}
        if train_stats:
            entry.update(train_loss=train_stats["loss"], train_time=round(train_stats["time"], 3),
                         train_replaced=train_stats["replaced"])
        results["evaluations"].append(entry)
        if info.is_main:
            write_results(os.path.join(out_dir, "results.json"), results)
            if board is not None:
                vals = {f"t2v_{k}": res["t2v"][k] for k in ("R1", "R5", "R10", "MR", "MeanR")}
                vals.update({f"v2t_{k}": res["v2t"][k] for k in ("R1", "R5", "R10", "MR", "MeanR")})
                board.scalars(vals, global_step, prefix="eval/")
                board.flush()

    def run_eval(tag, epoch, train_stats=None, final=False):
        res = evaluate(model, test_ds, batch_size=args.batch_size_val, workers=args.num_thread_reader,
                       device=device, precision=precision, progress=progress)
        log_eval(res, f"evaluation ({tag}, epoch {epoch}, step {global_step})")
        record(res, tag, epoch, train_stats)
        if final and args.save_sim_matrix:
            save_sim_matrices(args, model, res, bank_ds if bank_ds is not None else train_ds, tokenizer,
                              device, precision, progress, out_dir)
        return res

    step_losses = []
    last = None
    if args.do_eval:
        last = run_eval("eval", start_epoch, final=not args.do_train)
    if args.do_train:
        stop = args.epochs if args.max_epochs_this_run is None else min(args.epochs,
                                                                         start_epoch + args.max_epochs_this_run)
        log.info("training: %d samples, %d processes x batch %d (micro-batch %d x %d accumulation), "
                 "%d optimiser steps per epoch, epochs %d..%d of %d, lr %g, %s", len(train_ds), info.world_size,
                 args.batch_size, micro_batch, args.gradient_accumulation_steps,
                 batches // args.gradient_accumulation_steps, start_epoch + 1, stop, args.epochs, args.lr,
                 args.precision)
        for epoch in range(start_epoch, stop):
            sampler.set_epoch(epoch)
            seed_all(args.seed + 1000 * (epoch + 1) + info.rank)
            stats = train_one_epoch(model, loader, optimizer, schedule, precision, scaler, epoch=epoch,
                                    global_step=global_step, accumulation=args.gradient_accumulation_steps,
                                    clip_grad_norm=args.clip_grad_norm, n_display=args.n_display, device=device,
                                    board=board, progress=progress,
                                    step_callback=lambda step, loss: step_losses.append((step, loss)))
            global_step = stats["global_step"]
            log.info("epoch %d/%d finished: train loss %.4f, %d steps, %.1fs", epoch + 1, args.epochs,
                     stats["loss"], stats["steps"], stats["time"])
            if stats["samples"]:
                msg = f"epoch {epoch + 1}: {stats['replaced']} of {stats['samples']} training samples had an " \
                      "unreadable video and were replaced"
                (log.warning if stats["replaced"] else log.info)(msg)
            if board is not None:
                board.scalars({"epoch_loss": stats["loss"], "bad_videos_replaced": stats["replaced"]},
                              global_step, prefix="train/")
            last = run_eval("epoch", epoch + 1, stats, final=(epoch + 1 == stop))
            r1 = last["t2v"]["R1"]
            is_best = best_r1 <= r1
            if is_best:
                best_r1, best_epoch = r1, epoch + 1
                results["best"] = {"epoch": epoch + 1, "global_step": global_step, "t2v": last["t2v"],
                                   "v2t": last["v2t"]}
            if info.is_main:
                write_results(os.path.join(out_dir, "results.json"), results)
                ckpt = make_checkpoint(core, optimizer, scaler, epoch + 1, global_step, best_r1, extra={
                    "best_epoch": best_epoch, "rng": rng_state(), "schedule": schedule.state_dict(),
                    "config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                               for k, v in vars(args).items()},
                    "results": results})
                atomic_torch_save(ckpt, os.path.join(out_dir, CKPT))
                if is_best:
                    atomic_torch_save(ckpt, os.path.join(out_dir, CKPT_BEST))
                log.info("checkpoint: %s%s; best text-to-video R@1 %.2f (epoch %s)", os.path.join(out_dir, CKPT),
                         " (new best)" if is_best else "", best_r1, best_epoch)
            D.barrier()
        if stop < args.epochs:
            log.info("stopped after epoch %d of %d (--max_epochs_this_run); continue with --resume %s",
                     stop, args.epochs, os.path.join(out_dir, CKPT))
    if board is not None:
        board.close()
    total = time.time() - t_start
    log.info("done in %.1fs. output: %s (log.txt, results.json, config.json%s%s)", total, out_dir,
             ", ckpt.pth.tar, ckpt.best.pth.tar" if args.do_train else "",
             ", tensorboard/" if board is not None else "")
    D.barrier()
    summary = {"results": results, "last": None if last is None else {"t2v": last["t2v"], "v2t": last["v2t"]},
               "global_step": global_step, "time": total, "model": core, "step_losses": step_losses}
    D.cleanup()
    return summary


def save_sim_matrices(args, model, res, bank_ds, tokenizer, device, precision, progress, out_dir) -> None:
    """<datatype>_sim_matrix.npy (test texts x test videos) and, with a training set, the QB-norm query
    banks <datatype>_train_test_t2v.npy (train texts x test videos) and <datatype>_train_test_v2t.npy
    (test texts x train videos)."""
    from training.engine import encode_texts, encode_videos, similarity_matrix

    core = unwrap(model)
    prefix = os.path.join(out_dir, args.datatype)
    if D.is_main_process():
        atomic_np_save(prefix + "_sim_matrix.npy", res["sim"])
        log.info("saved %s_sim_matrix.npy %s", prefix, tuple(res["sim"].shape))
    if tokenizer is not None and (bank_ds is None or getattr(bank_ds, "random_sampling", False)):
        # The training split with evaluation-style frames (segment centres).
        from dataloaders import build_test_dataset
        try:
            bank_ds = build_test_dataset(args, tokenizer, "train")
        except Exception as e:  # noqa: BLE001 - the bank is optional
            log.warning("no training set for the QB-norm query bank (%s)", str(e).splitlines()[0] if str(e) else e)
            bank_ds = None
    if bank_ds is None or not hasattr(bank_ds, "text_dataset"):
        log.info("QB-norm query bank not written: no training set")
        return
    texts, videos = bank_ds.text_dataset(), bank_ds.video_dataset()
    limit = args.qb_norm_train_queries
    if limit:
        from torch.utils.data import Subset
        texts = Subset(texts, range(min(limit, len(texts))))
        videos = Subset(videos, range(min(limit, len(videos))))
    was = core.training
    core.eval()
    bank_t = encode_texts(core, texts, args.batch_size_val, args.num_thread_reader, device, precision, progress,
                          desc="train text (QB-norm)")
    bank_v, _ = encode_videos(core, videos, args.batch_size_val, args.num_thread_reader, device, precision, progress,
                              desc="train video (QB-norm)")
    if was:
        core.train()
    if D.is_main_process():
        t2v = similarity_matrix(core, bank_t, res["video_features"], device)
        v2t = similarity_matrix(core, res["text_features"], bank_v, device)
        atomic_np_save(prefix + "_train_test_t2v.npy", t2v)
        atomic_np_save(prefix + "_train_test_v2t.npy", v2t)
        log.info("saved QB-norm query banks %s_train_test_t2v.npy %s and %s_train_test_v2t.npy %s",
                 prefix, t2v.shape, prefix, v2t.shape)
