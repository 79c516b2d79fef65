"""What main.py runs: build everything from the flags, train / evaluate, checkpoint, log.

``run(args, model=..., train_dataset=..., test_dataset=...)`` accepts ready-made pieces so that the
tests can drive the same loop with tiny models and in-memory datasets.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from analysis.query_ranks import evaluation_extras, write_query_ranks
from dataloaders.base import BadVideoError
from dataloaders.frame_cache import FrameCacheUse, describe_use
from modules.backends import USES, backend_name, backends_from_name, recorded_choice
from modules.checkpoints import CheckpointError, checkpoint_latent_space, is_own_checkpoint, load_checkpoint_file
from modules.dgl import DGLConfig
from modules.order import OrderNegatives
from runtime.cpu import apply_cpu_settings, restore as restore_cpu_settings
from runtime.errors import fail, first_line
from runtime.files import OutputWriteError, atomic_np_save, atomic_torch_save
from runtime.logs import close_logging, log_to_file_only, progress_bars_wanted, setup_logging
from runtime.precision import Precision
from training import distributed as D
from training.checkpoint import make_checkpoint, rng_state, set_rng_state
from training.config import config_to_json, resolve_clip_path
from training.data_checks import check_spans, leave_out_bad_video_files, warn_test_videos_in_training
from training.engine import evaluate, log_eval, train_one_epoch, unwrap
from training.model_options import apply_auto_compile, apply_model_options
from training.optim import WarmupCosineSchedule, build_optimizer, total_optimization_steps
from training.outputs import (CKPT, CKPT_BEST, Board, check_output_dir, prepare_output_dir, unlock_output_dir,
                              write_results)
from training.qb_bank import report_test_captions_in_bank, save_caption_video_index, save_train_train
from training.repro import write_run_record

log = logging.getLogger("dgl")


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
        fail(first_line(e))
    try:
        model = DGL.from_pretrained(clip_path, **DGLConfig.from_options(args).to_dict())
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        fail(f"cannot build DGL on {clip_path}: {first_line(e)}")
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
        fail(f"cannot load the {args.datatype} data: {first_line(e)}")
    return train_ds, test_ds


# ------------------------------------------------------------------------------------------ the run
def run(args, *, model=None, tokenizer=None, train_dataset=None, test_dataset=None, bank_dataset=None) -> dict:
    """main.py: the steps below, in order. Returns a summary (results, last metrics, model, step losses)."""
    t_start = time.time()
    info = D.setup(args.device, args.dist_backend, args.gpu)
    check_output_dir(args)  # a folder holding another run is refused before anything is loaded or written
    if model is None:  # before anything is written: a bad CLIP / vocabulary path is reported as one line
        seed_all(args.seed)
        model, tokenizer, args.clip_path = build_model_and_tokenizer(args)
    D.barrier()
    notes = prepare_output_dir(args, info.is_main)
    D.barrier()
    setup_logging(args.output_dir, info.is_main, info.rank, args.debug)
    for note in notes:
        log.info(note)
    r = Run(args, info, model, tokenizer, train_dataset, test_dataset, bank_dataset, t_start)
    try:
        r.describe_setup()
        r.load_resume_weights()
        r.validate_data()
        r.build_training()
        r.restore_state()
        r.open_logs()
        write_run_record(args, r.info, r.precision, r.out_dir)  # every process: it gathers the device names
        if args.do_eval:
            r.evaluate("eval", r.start_epoch, final=not args.do_train)
        if args.do_train:
            r.train()
        return r.finish()
    except (BadVideoError, OutputWriteError) as exc:
        r.stop(exc)
    finally:
        restore_cpu_settings()
        close_logging()
        unlock_output_dir(args.output_dir)  # taken by prepare_output_dir


class Run:
    """What one invocation of main.py holds; each method is one step of :func:`run`."""

    def __init__(self, args, info, model, tokenizer, train_ds, test_ds, bank_ds, t_start: float):
        self.args, self.info, self.device = args, info, info.device
        self.out_dir = args.output_dir
        self.model = self.core = model  # self.model becomes the DDP wrapper in a distributed run
        self.tokenizer = tokenizer
        self.train_ds, self.test_ds, self.bank_ds = train_ds, test_ds, bank_ds
        self.t_start = t_start
        self.progress = info.is_main and progress_bars_wanted(args.no_progress)
        self.precision = Precision(args.precision, self.device, args.eval_precision)
        self.loader = self.sampler = self.optimizer = self.schedule = self.scaler = self.board = None
        self.micro_batch = args.batch_size // args.gradient_accumulation_steps
        self.batches_per_epoch = 1
        # progress, restored by --resume and advanced by training
        self.start_epoch, self.global_step = 0, 0
        self.best_r1, self.best_epoch = float("-inf"), None
        self.results = {"evaluations": [], "best": None}
        self.step_losses: list[tuple[int, float]] = []
        self.last = None
        self.epochs_saved = None  # epochs completed in the newest ckpt.pth.tar of this folder
        self.left_out: dict = {}  # bad videos left out up front (--skip_bad_videos), per split
        self.resume_ckpt: dict | None = None
        order = getattr(args, "order_negatives", "none") or "none"
        self.order_negatives = (None if order == "none" else
                                OrderNegatives(order, getattr(args, "order_negative_weight", 1.0), args.seed))

    # ---------------------------------------------------------------------------------- setup
    def describe_setup(self) -> None:
        info = self.info
        if info.distributed:
            log.info("distributed: %d processes (%s), this is rank %d on %s", info.world_size, info.backend,
                     info.rank, self.device)
        else:
            log.info("single process on %s", self.device)
        if self.precision.note:
            log.warning(self.precision.note)
        recorded = None
        given_path = getattr(self.args, "fp32_path", None)
        if self.args.resume:  # read first: its recorded kernels are used before any product runs, without timing
            self.resume_ckpt = self._read_checkpoint(self.args.resume, "--resume")
            recorded = recorded_kernels(self.resume_ckpt, self.device.type, given_path,
                                        getattr(self.args, "attention_backend", "auto") or "auto")
        apply_cpu_settings(self.args, self.device, self.core, self.precision,  # threads, BLAS, attention, bf16
                           recorded=recorded)
        if given_path is not None and self.precision.fp32_path == given_path:
            self.precision.fp32_source = "--fp32_path"
        elif recorded is not None and self.precision.kernels is not None:
            self.precision.fp32_source = f"recorded in {self.args.resume}"
        if info.distributed:  # one choice for all processes: each measured its own
            self._use_rank0_kernels()
            self._use_attention_backends(rank0_attention_backends(self.precision), "rank 0's choice")
        if getattr(self.args, "clip_path", None):
            log.info("CLIP weights: %s", self.args.clip_path)
        n_train = self.core.num_trainable_parameters()
        n_all = sum(p.numel() for p in self.core.parameters())
        log.info("trainable parameters: %d (%.2fM) of %d (%.2f%%)", n_train, n_train / 1e6, n_all,
                 100.0 * n_train / max(n_all, 1))
        for name, p in self.core.trainable_parameters():
            log.debug("  trainable %s %s", name, tuple(p.shape))

    def validate_data(self) -> None:
        """Build the datasets (unless given) and check that training has what it needs."""
        args = self.args
        args.image_resolution = int(self.core.image_resolution)
        if self.train_ds is None and self.test_ds is None:
            self.train_ds, self.test_ds = build_datasets(args, self.tokenizer, need_train=bool(args.do_train))
        if args.do_train and self.train_ds is None:
            fail("training needs a training set")
        checks = [("test", self.test_ds)] + ([("train", self.train_ds)] if args.do_train else [])
        for split, dataset in checks:
            record = leave_out_bad_video_files(dataset, split, bool(args.skip_bad_videos), self.progress)
            if record:
                self.left_out[split] = record
            if args.datatype == "custom":
                record = check_spans(dataset, split, bool(args.skip_bad_videos),
                                     bool(getattr(args, "clip_spans_to_video", 0)))
                if record:
                    self.left_out[split] = _merge_left_out(self.left_out.get(split), record)
        if args.datatype == "custom":
            shared = warn_test_videos_in_training(args, self.train_ds, self.test_ds)
            if shared:
                self.results["test_videos_in_training"] = shared

    def build_training(self) -> None:
        """Model on its device (DDP-wrapped when distributed), training loader, optimiser, schedule, scaler."""
        args, info = self.args, self.info
        self.core.to(self.device)
        apply_model_options(self.core, self.args, info.world_size)  # --grad_checkpointing, --compile
        if info.distributed:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            # the postfix text prompts never get a gradient (published quirk), hence find_unused_parameters
            self.model = torch.nn.parallel.DistributedDataParallel(self.core, find_unused_parameters=True,
                                                                   **ddp_kwargs)
        if args.do_train:
            if getattr(args, "batch_groups", 0):
                self.sampler = self._group_sampler()
            else:
                self.sampler = DistributedSampler(self.train_ds, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
            self.loader = DataLoader(self.train_ds, batch_size=self.micro_batch, sampler=self.sampler,
                                     drop_last=True, num_workers=args.num_thread_reader,
                                     pin_memory=self.device.type == "cuda")
            if len(self.loader) < args.gradient_accumulation_steps:
                fail(f"the training set ({len(self.train_ds)} samples) is smaller than one global batch "
                     f"({args.batch_size} x {info.world_size} processes); lower --batch_size")
            self.batches_per_epoch = len(self.loader)
        apply_auto_compile(self.core, args, self.batches_per_epoch * args.epochs if args.do_train else 0)
        total_steps = total_optimization_steps(self.batches_per_epoch, args.gradient_accumulation_steps, args.epochs)
        self.optimizer = build_optimizer(self.core.trainable_parameters(), args.lr, args.wd, args.coef_lr,
                                         (args.beta1, args.beta2), args.eps)
        self.schedule = WarmupCosineSchedule(args.lr, total_steps, args.warmup_proportion, args.wd)
        self.scaler = self.precision.make_scaler()

    def _group_sampler(self):
        """--batch_groups: the rows of one 'group' in the same global batch (dataloaders/groups.py)."""
        from dataloaders.base import AnnotationError
        from dataloaders.groups import GroupBatchSampler

        args, info = self.args, self.info
        if not hasattr(self.train_ds, "item_groups"):
            fail("--batch_groups needs --datatype custom (a 'group' column in --train_csv)")
        try:
            groups = self.train_ds.item_groups()
            sampler = GroupBatchSampler(groups, self.micro_batch, info.world_size, info.rank, args.seed,
                                        describe_batch=f" (--batch_size {args.batch_size} / "
                                        f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x "
                                        f"{info.world_size} processes)")
        except (AnnotationError, ValueError) as e:
            fail(str(e))
        log.info("--batch_groups: %d groups of the %d training items kept in one global batch of %d",
                 len(sampler.members), len(groups), sampler.global_batch)
        return sampler

    def load_resume_weights(self) -> None:
        """--resume: read the checkpoint and load its weights (before the data, so that a wrong file is found
        at once); its progress is restored by restore_state once the optimiser exists. --init_checkpoint: the
        weights only (load_init_weights)."""
        self.load_init_weights()
        if not self.args.resume:
            return
        if self.resume_ckpt is None:
            self.resume_ckpt = self._read_checkpoint(self.args.resume, "--resume")
        self._check_resume_flags(self.resume_ckpt, self.args.resume)
        self._load_weights(self.resume_ckpt, self.args.resume, "--resume")
        log.info("[resume] loaded weights from %s (%s checkpoint, epoch %s, step %s)", self.args.resume,
                 "our" if is_own_checkpoint(self.resume_ckpt) else "official", self.resume_ckpt.get("epoch"),
                 self.resume_ckpt.get("global_step"))
        recorded = self.resume_ckpt.get("attention_backends")
        if (self.args.attention_backend == "auto" and isinstance(recorded, dict)
                and recorded.get("device") == self.device.type):
            try:
                self._use_attention_backends(recorded, f"recorded in {self.args.resume}")
            except ValueError as e:
                log.warning("[resume] attention backends of the checkpoint not used: %s", e)

    def _check_resume_flags(self, ckpt: dict, path: str) -> None:
        """--resume with a model flag the checkpoint was not trained with: refused when training (the run
        would go on as another model; the weights load whenever the shapes agree), a warning when only
        evaluating (a deliberate test of the trained weights under other flags)."""
        mismatch = checkpoint_flag_mismatch(ckpt, self.args)
        if mismatch is None:
            return
        flag, trained, given = mismatch
        if self.args.do_train:
            fail(f"--resume {path} was trained with {flag} {trained}; this run has {flag} {given} (a resumed run "
                 f"continues with the checkpoint's model flags: pass {flag} {trained})")
        log.warning("[resume] %s was trained with %s %s; this evaluation runs with %s %s", path, flag, trained,
                    flag, given)

    def _use_rank0_kernels(self) -> None:
        """Compute with rank 0's kernels in every process: a process whose own timing chose others applies the
        CPU settings again with rank 0's choices (no timing; oneDNN still only where exact here)."""
        if self.device.type != "cpu":
            return
        kernels = D.broadcast_object(self.precision.kernels)
        if kernels is None or kernels == self.precision.kernels:
            return
        restore_cpu_settings()
        apply_cpu_settings(self.args, self.device, self.core, self.precision, recorded=kernels)
        self.precision.fp32_source = "rank 0's choice"

    def _use_attention_backends(self, names: dict, source: str) -> None:
        """Train and evaluate under the attention backends ``names`` ({"train": .., "eval": ..}) instead of
        this process's own choice, so that a rerun or a resumed run computes as the first one did."""
        train, evaluation = backends_from_name(names["train"]), backends_from_name(names["eval"])
        self.precision.train_attention, self.precision.eval_attention = train, evaluation
        self.precision.attention_source = source
        log.info("attention backend (%s): evaluation %s, training %s", source, names["eval"], names["train"])

    def attention_record(self) -> dict:
        """The attention backends this run computes with, as checkpoints record them."""
        return {"train": backend_name(self.precision.train_attention),
                "eval": backend_name(self.precision.eval_attention), "device": self.device.type}

    def kernel_record(self) -> dict:
        """The kernels of each use this run computes with (and the timings that chose them), as checkpoints
        record them for --resume."""
        timed = self.precision.kernels or {}
        record = {"device": self.device.type}
        for use, attention, fp32 in (("train", self.precision.train_attention, self.precision.train_fp32_path),
                                     ("eval", self.precision.eval_attention, self.precision.eval_fp32_path)):
            record[use] = {**timed.get(use, {}), "attention": backend_name(attention),
                           "fp32_products": fp32 or self.precision.fp32_path or "mkl"}
        return record

    def load_init_weights(self) -> None:
        """--init_checkpoint: a new run from a checkpoint's prompts. Only the weights are taken (epoch 0, a
        new optimiser and schedule); the checkpoint's model flags must be this run's."""
        path = self.args.init_checkpoint if getattr(self.args, "init_checkpoint", None) else None
        if path is None:
            return
        ckpt = self._read_checkpoint(path, "--init_checkpoint")
        own = is_own_checkpoint(ckpt)
        mismatch = checkpoint_flag_mismatch(ckpt, self.args)
        if mismatch:
            fail(f"--init_checkpoint {path} was trained with {mismatch[0]} {mismatch[1]}; this run has "
                 f"{mismatch[0]} {mismatch[2]} (the model flags must match the checkpoint: pass {mismatch[0]} "
                 f"{mismatch[1]})")
        self._load_weights(ckpt, path, "--init_checkpoint")
        self.args._init_checkpoint_info = {"kind": "ours" if own else "official", "epoch": ckpt.get("epoch"),
                                           "global_step": ckpt.get("global_step")}
        log.info("[init] a new run from the weights of %s (%s checkpoint, trained %s epochs); optimiser, "
                 "schedule and epochs start afresh", path, "our" if own else "official", ckpt.get("epoch"))

    def restore_state(self) -> None:
        """--resume without --load_from_pretrained: the progress (epoch, step, best, optimiser, scaler, RNG,
        results) of the checkpoint."""
        if self.resume_ckpt is not None and not self.args.load_from_pretrained:
            self._restore_progress(self.resume_ckpt, is_own_checkpoint(self.resume_ckpt))

    @staticmethod
    def _read_checkpoint(path: str, flag: str) -> dict:
        try:
            return load_checkpoint_file(path)
        except CheckpointError as e:
            fail(f"{flag} {e}")
        except OSError as e:
            fail(f"cannot read {flag} {path}: {os.strerror(e.errno).lower() if e.errno else e}")

    def _load_weights(self, ckpt: dict, path: str, flag: str) -> None:
        space, wanted = checkpoint_latent_space(ckpt), self.core.config.shared_latent_space
        if space is not None and space != wanted:
            fail(f"{flag} {path}: this checkpoint is a {space}-latent-space DGL; pass --shared_latent_space "
                 f"{space} (the model was built with --shared_latent_space {wanted})")
        try:
            self.core.load_checkpoint(ckpt)
        except (ValueError, KeyError, RuntimeError) as e:
            fail(f"cannot load {flag} {path}: {first_line(e)[:400]}")

    def _restore_progress(self, ckpt: dict, own: bool) -> None:
        args = self.args
        self.start_epoch = int(ckpt.get("epoch", 0) or 0)
        self.global_step = int(ckpt.get("global_step", 0) or 0)
        self.epochs_saved = self.start_epoch
        if ckpt.get("best_acc1") is not None and own:
            self.best_r1 = float(ckpt["best_acc1"])
            self.best_epoch = ckpt.get("best_epoch")
        if args.do_train and ckpt.get("optimizer"):
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                log.warning("[resume] optimiser state not loaded (%s); AdamW moments start from zero", e)
        if args.do_train and self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if own:
            if args.do_train:  # the run continues: keep its evaluation history
                self.results = ckpt.get("results") or self.results
            set_rng_state(ckpt.get("rng"))
            old_total = ckpt.get("schedule", {}).get("total_steps")
            new_total = self.schedule.total_steps
            if args.do_train and old_total is not None and abs(old_total - new_total) > 1e-6:
                log.warning("[resume] the schedule length changed (%s -> %s optimiser steps): --epochs, "
                            "--batch_size or the process count differ from the interrupted run",
                            old_total, new_total)
        if args.do_train and self.start_epoch >= args.epochs:
            log.info("[resume] this run is already finished: the checkpoint completed %d of --epochs %d; "
                     "nothing to train (raise --epochs to train further)", self.start_epoch, args.epochs)

    def open_logs(self) -> None:
        """TensorBoard and config.json (main process)."""
        if not self.info.is_main:
            return
        if not self.args.no_tensorboard:
            # a resumed run redoes the steps logged after its checkpoint: TensorBoard drops the earlier ones
            purge = self.global_step + 1 if (self.args.do_train and self.args.resume) else None
            self.board = Board(os.path.join(self.out_dir, "tensorboard"), purge_step=purge)
        config_to_json(self.args, os.path.join(self.out_dir, "config.json"))
        log.info("configuration saved to %s", os.path.join(self.out_dir, "config.json"))

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, tag: str, epoch: int, train_stats: dict | None = None, final: bool = False) -> dict:
        """Evaluate on the test set, log, append to results.json (and with --save_sim_matrix at the end, save
        the similarity matrices)."""
        args = self.args
        res = evaluate(self.model, self.test_ds, batch_size=args.batch_size_val, workers=args.num_thread_reader,
                       device=self.device, precision=self.precision, progress=self.progress, dsl=args.dsl,
                       dsl_temperature=args.dsl_temperature, order_metric=bool(getattr(args, "order_metric", 1)))
        log_eval(res, f"evaluation ({tag}, epoch {epoch}, step {self.global_step})")
        if self.info.is_main:
            res["ranks_file"] = write_query_ranks(self.out_dir, res, self.test_ds, tag, epoch, self.global_step)
        self._record(res, tag, epoch, train_stats)
        if final and args.save_sim_matrix:
            bank = self.bank_ds if self.bank_ds is not None else self.train_ds
            save_sim_matrices(args, self.model, res, bank, self.tokenizer, self.device, self.precision,
                              self.progress, self.out_dir, test_ds=self.test_ds)
        self.last = res
        return res

    def _record(self, res: dict, tag: str, epoch: int, train_stats: dict | None) -> None:
        entry = {"tag": tag, "epoch": epoch, "global_step": self.global_step, "t2v": res["t2v"], "v2t": res["v2t"],
                 "num_captions": res["num_captions"], "num_videos": res["num_videos"],
                 "multi_sentence": bool(res.get("multi_sentence")), "eval_time": round(res["time"], 3)}
        left_out = self._test_videos_left_out(res)
        if left_out:
            entry["test_left_out"] = left_out
        if train_stats:
            entry.update(train_loss=train_stats["loss"], train_time=round(train_stats["time"], 3),
                         train_replaced=train_stats["replaced"])
        if res.get("frame_cache"):  # clips served by --frame_cache and read from their files
            entry["frame_cache"] = res["frame_cache"]
        if train_stats and train_stats.get("frame_cache"):
            entry["train_frame_cache"] = train_stats["frame_cache"]
        if res.get("order"):
            entry["order"] = res["order"]
        entry.update(evaluation_extras(res))
        self.results["evaluations"].append(entry)
        if self.left_out:
            self.results["left_out"] = self.left_out
        if self.info.is_main:
            write_results(os.path.join(self.out_dir, "results.json"), self.results)
            if self.board is not None:
                vals = {f"t2v_{k}": res["t2v"][k] for k in ("R1", "R5", "R10", "MR", "MeanR")}
                vals.update({f"v2t_{k}": res["v2t"][k] for k in ("R1", "R5", "R10", "MR", "MeanR")})
                self.board.scalars(vals, self.global_step, prefix="eval/")
                self.board.flush()

    def _test_videos_left_out(self, res: dict) -> dict | None:
        """Test videos and captions this evaluation lacks: missing at start-up plus undecodable now."""
        start = self.left_out.get("test", {})
        videos = start.get("videos", 0) + len(res.get("unreadable_videos") or [])
        if not videos:
            return None
        return {"videos": videos, "captions": start.get("captions", 0) + res.get("captions_left_out", 0),
                "comparable_to_full_test_set": False}

    # ---------------------------------------------------------------------------------- training
    def train(self) -> None:
        """Epochs start_epoch+1 .. stop: train, evaluate, save."""
        args = self.args
        stop = args.epochs if args.max_epochs_this_run is None else min(args.epochs,
                                                                         self.start_epoch + args.max_epochs_this_run)
        if self.start_epoch >= stop:
            return  # a finished run (restore_state said so)
        log.info("training: %d samples, %d processes x batch %d (micro-batch %d x %d accumulation), "
                 "%d optimiser steps per epoch, epochs %d..%d of %d, lr %g, %s", len(self.train_ds),
                 self.info.world_size, args.batch_size, self.micro_batch, args.gradient_accumulation_steps,
                 self.batches_per_epoch // args.gradient_accumulation_steps, self.start_epoch + 1, stop,
                 args.epochs, args.lr, args.precision)
        if self.order_negatives is not None:
            log.info("order negatives: every training video also %s as a text-to-video negative, weight %g",
                     "reversed" if self.order_negatives.kind == "reverse" else "shuffled (seeded, never in order)",
                     self.order_negatives.weight)
            if getattr(getattr(self.core, "config", None), "shared_latent_space", None) == "linear":
                log.warning("--order_negatives with the linear latent space: its video features do not depend on "
                            "the frame order, so each copy scores like its own video (a negative equal to the "
                            "positive); use --shared_latent_space transformer")
        for epoch in range(self.start_epoch, stop):
            stats = self.train_epoch(epoch)
            res = self.evaluate("epoch", epoch + 1, stats, final=(epoch + 1 == stop))
            self.save(epoch + 1, res)
        if stop < args.epochs:
            log.info("stopped after epoch %d of %d (--max_epochs_this_run); continue with --resume %s",
                     stop, args.epochs, os.path.join(self.out_dir, CKPT))

    def train_epoch(self, epoch: int) -> dict:
        args = self.args
        self.sampler.set_epoch(epoch)
        seed_all(args.seed + 1000 * (epoch + 1) + self.info.rank)
        stats = train_one_epoch(self.model, self.loader, self.optimizer, self.schedule, self.precision, self.scaler,
                                epoch=epoch, global_step=self.global_step,
                                accumulation=args.gradient_accumulation_steps, clip_grad_norm=args.clip_grad_norm,
                                n_display=args.n_display, device=self.device, board=self.board,
                                progress=self.progress, step_callback=self._remember_loss,
                                contrastive_chunk_size=args.contrastive_chunk_size,
                                order_negatives=self.order_negatives)
        self.global_step = stats["global_step"]
        log.info("epoch %d/%d finished: train loss %.4f, %d steps, %.1fs", epoch + 1, args.epochs,
                 stats["loss"], stats["steps"], stats["time"])
        if stats["samples"]:
            msg = f"epoch {epoch + 1}: {stats['replaced']} of {stats['samples']} training samples had an " \
                  "unreadable video and were replaced"
            (log.warning if stats["replaced"] else log.info)(msg)
        described = describe_use(stats.get("frame_cache"), f"epoch {epoch + 1} training")
        if described:
            log.log(*described)
        if self.board is not None:
            self.board.scalars({"epoch_loss": stats["loss"], "bad_videos_replaced": stats["replaced"]},
                               self.global_step, prefix="train/")
        return stats

    def _remember_loss(self, step: int, loss: float) -> None:
        self.step_losses.append((step, loss))

    def save(self, epochs_done: int, res: dict) -> None:
        """results.json and ckpt.pth.tar (and ckpt.best.pth.tar on a new best), written atomically."""
        r1 = res["t2v"]["R1"]
        is_best = self.best_r1 <= r1
        if is_best:
            self.best_r1, self.best_epoch = r1, epochs_done
            self.results["best"] = {"epoch": epochs_done, "global_step": self.global_step, "t2v": res["t2v"],
                                    "v2t": res["v2t"]}
        if self.info.is_main:
            write_results(os.path.join(self.out_dir, "results.json"), self.results)
            ckpt = make_checkpoint(self.core, self.optimizer, self.scaler, epochs_done, self.global_step,
                                   self.best_r1, extra={
                                       "best_epoch": self.best_epoch, "rng": rng_state(),
                                       "schedule": self.schedule.state_dict(), "config": _plain_config(self.args),
                                       "results": self.results, "attention_backends": self.attention_record(),
                                       "fp32_products": {"path": self.precision.fp32_path,
                                                         "device": self.device.type},
                                       "kernels": self.kernel_record()})
            atomic_torch_save(ckpt, os.path.join(self.out_dir, CKPT))
            self.epochs_saved = epochs_done
            if is_best:
                atomic_torch_save(ckpt, os.path.join(self.out_dir, CKPT_BEST))
            log.info("checkpoint: %s%s; best text-to-video R@1 %.2f (epoch %s)", os.path.join(self.out_dir, CKPT),
                     " (new best)" if is_best else "", self.best_r1, self.best_epoch)
        D.barrier()

    # ---------------------------------------------------------------------------------- end
    def stop(self, exc: BaseException) -> None:
        """A video that fails to decode, or a file that cannot be written: one line, exit status 2; the
        files already saved stay as they are (every write is atomic)."""
        message = first_line(exc)
        if isinstance(exc, BadVideoError) and not self.args.skip_bad_videos:
            message += "; fix or remove the file, or pass --skip_bad_videos"
        ckpt = os.path.join(self.out_dir, CKPT)
        if self.args.do_train and self.epochs_saved and os.path.isfile(ckpt):
            message += f"; {ckpt} (epoch {self.epochs_saved}) is intact: continue with --resume {ckpt}"
        log_to_file_only(logging.ERROR, message)
        if self.board is not None:
            self.board.close()  # keep what was logged
        fail(message)

    def finish(self) -> dict:
        if self.board is not None:
            self.board.close()
        total = time.time() - self.t_start
        log.info("done in %.1fs. output: %s (log.txt, results.json, config.json%s%s)", total, self.out_dir,
                 ", ckpt.pth.tar, ckpt.best.pth.tar" if self.args.do_train else "",
                 ", tensorboard/" if self.board is not None else "")
        D.barrier()
        last = self.last
        summary = {"results": self.results, "last": None if last is None else {"t2v": last["t2v"], "v2t": last["v2t"]},
                   "global_step": self.global_step, "time": total, "model": self.core,
                   "step_losses": self.step_losses}
        D.cleanup()
        return summary


def checkpoint_flag_mismatch(ckpt: dict, args) -> tuple[str, object, object] | None:
    """``(--flag, checkpoint's value, this run's value)`` of the first model flag that our checkpoint's
    recorded configuration (``ckpt["config"]``) gives differently from ``args``; None when all agree or
    nothing is recorded (official checkpoints: their latent space and shapes are checked on loading)."""
    for name, recorded in DGLConfig.recorded_in(ckpt).items():
        wanted = getattr(args, name, None)
        if wanted is None:
            continue
        if isinstance(recorded, bool):  # a 0/1 flag on the command line
            recorded, wanted = int(recorded), int(bool(wanted))
        if recorded != wanted:
            return f"--{name}", recorded, wanted
    return None


def _merge_left_out(first: dict | None, second: dict) -> dict:
    """Two records of videos left out of one split (missing files, then unreadable ones)."""
    if not first:
        return second
    merged = dict(first)
    merged["videos"] = first["videos"] + second["videos"]
    merged["captions"] = first["captions"] + second["captions"]
    merged["files"] = (first.get("files", []) + second.get("files", []))[:100]
    return merged


def recorded_kernels(ckpt: dict, device_type: str, fp32_flag: str | None, attention_flag: str) -> dict | None:
    """{use: choice record} a --resume checkpoint recorded on this device type (older checkpoints: their
    fp32 product path and attention backends), with --fp32_path / --attention_backend given on the command
    line in their place; None when it recorded nothing for this device type."""
    kernels = ckpt.get("kernels")
    if isinstance(kernels, dict) and kernels.get("device") == device_type \
            and all(isinstance(kernels.get(use), dict) for use in USES):
        recorded = {use: dict(kernels[use]) for use in USES}
    else:
        fp32, attention = ckpt.get("fp32_products"), ckpt.get("attention_backends")
        if not (isinstance(fp32, dict) and fp32.get("device") == device_type and fp32.get("path") in ("onednn", "mkl")
                and isinstance(attention, dict) and attention.get("device") == device_type):
            return None
        recorded = {use: {"fp32_products": fp32["path"], "attention": attention.get(use)} for use in USES}
    for record in recorded.values():
        if fp32_flag is not None:
            record["fp32_products"] = fp32_flag
        if attention_flag != "auto":
            record["attention"] = attention_flag
        try:
            recorded_choice(record)
        except ValueError as e:
            log.warning("[resume] kernels recorded in the checkpoint not used: %s", e)
            return None
    return recorded


def rank0_attention_backends(precision) -> dict:
    """Rank 0's attention backends, as names, on every process."""
    return D.broadcast_object({"train": backend_name(precision.train_attention),
                               "eval": backend_name(precision.eval_attention)})


def _plain_config(args) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()}


def save_sim_matrices(args, model, res, bank_ds, tokenizer, device, precision, progress, out_dir,
                      test_ds=None) -> None:
    """<datatype>_sim_matrix.npy (test texts x test videos) and, with a training set, the QB-norm query
    banks <datatype>_train_test_t2v.npy (train texts x test videos) and <datatype>_train_test_v2t.npy
    (test texts x train videos)."""
    from training.engine import encode_texts, encode_videos, frame_cache_counts, similarity_matrix

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
