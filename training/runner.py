"""What main.py runs, in order: the flags' pieces are built (model, data), the data checked, the kernels
chosen, then training and evaluation, with checkpoints and logs. The training step itself is
training/step.py; one evaluation is training/evaluation.py.

``run(args, model=..., train_dataset=..., test_dataset=...)`` accepts ready-made pieces so that the
tests can drive the same loop with tiny models and in-memory datasets.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from analysis.query_ranks import write_query_ranks
from dataloaders.base import BadVideoError
from modules.checkpoints import is_own_checkpoint
from modules.dgl import DGLConfig
from runtime.cpu import apply_cpu_settings, restore as restore_cpu_settings
from runtime.errors import fail, first_line
from runtime.files import OutputWriteError, atomic_torch_save
from runtime.logs import close_logging, log_to_file_only, progress_bars_wanted, setup_logging
from runtime.precision import Precision
from training import distributed as D
from training.checkpoint import (check_resume_flags, checkpoint_flag_mismatch, load_weights, make_checkpoint,
                                 plain_config, read_checkpoint, rng_state, seed_all, set_rng_state)
from training.config import config_to_json, resolve_clip_path
from training.data_checks import check_run_data
from training.evaluation import evaluate, log_eval
from training.kernels import (attention_record, kernel_record, rank0_attention_backends, recorded_kernels,
                              use_attention_backends)
from training.model_options import apply_auto_compile, apply_model_options
from training.optim import WarmupCosineSchedule, build_optimizer, total_optimization_steps
from training.outputs import (CKPT, CKPT_BEST, Board, check_output_dir, evaluation_entry, prepare_output_dir,
                              unlock_output_dir, write_results)
from training.qb_bank import save_sim_matrices
from training.repro import write_run_record
from training.step import order_negatives_from_flags, train_one_epoch

log = logging.getLogger("dgl")


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
        r.validate_data()  # before the kernels are timed (build_training): a broken input fails in seconds
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
    """What one invocation of main.py holds (model, data, optimiser, progress, results, logs); each public
    method is one step of :func:`run`."""

    def __init__(self, args, info, model, tokenizer, train_ds, test_ds, bank_ds, t_start: float):
        self.args, self.info, self.device = args, info, info.device
        self.out_dir = args.output_dir
        self.model = self.core = model  # self.model becomes the DDP wrapper in a distributed run
        self.tokenizer = tokenizer
        self.train_ds, self.test_ds, self.bank_ds = train_ds, test_ds, bank_ds
        self.t_start = t_start
        self.progress = info.is_main and progress_bars_wanted(args.no_progress)
        self.precision = Precision(args.precision, self.device, args.eval_precision)
        self.loader = self.optimizer = self.schedule = self.scaler = self.board = None
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
        if getattr(self.args, "clip_path", None):
            log.info("CLIP weights: %s", self.args.clip_path)
        n_train = self.core.num_trainable_parameters()
        n_all = sum(p.numel() for p in self.core.parameters())
        log.info("trainable parameters: %d (%.2fM) of %d (%.2f%%)", n_train, n_train / 1e6, n_all,
                 100.0 * n_train / max(n_all, 1))
        for name, p in self.core.trainable_parameters():
            log.debug("  trainable %s %s", name, tuple(p.shape))

    def load_resume_weights(self) -> None:
        """--init_checkpoint (the weights only) or --resume: read the checkpoint and load its weights (before
        the data, so that a wrong file is found at once); its progress is restored by restore_state once the
        optimiser exists, its kernels are taken by build_training."""
        args = self.args
        if getattr(args, "init_checkpoint", None):
            load_init_weights(self.core, args)
        if not args.resume:
            return
        self.resume_ckpt = read_checkpoint(args.resume, "--resume")
        check_resume_flags(self.resume_ckpt, args, args.resume)
        load_weights(self.core, self.resume_ckpt, args.resume, "--resume")
        log.info("[resume] loaded weights from %s (%s checkpoint, epoch %s, step %s)", args.resume,
                 "our" if is_own_checkpoint(self.resume_ckpt) else "official", self.resume_ckpt.get("epoch"),
                 self.resume_ckpt.get("global_step"))

    def validate_data(self) -> None:
        """Build the datasets (unless given) and check that training has what it needs."""
        args = self.args
        args.image_resolution = int(self.core.image_resolution)
        if self.train_ds is None and self.test_ds is None:
            self.train_ds, self.test_ds = build_datasets(args, self.tokenizer, need_train=bool(args.do_train))
        if args.do_train and self.train_ds is None:
            fail("training needs a training set")
        self.left_out, shared = check_run_data(args, self.train_ds, self.test_ds, self.progress)
        if shared:
            self.results["test_videos_in_training"] = shared

    def build_training(self) -> None:
        """Kernels, model on its device (DDP-wrapped when distributed), training loader, optimiser, schedule,
        scaler."""
        args, info = self.args, self.info
        choose_kernels(args, info, self.core, self.precision, self.resume_ckpt)
        self.core.to(self.device)
        apply_model_options(self.core, self.args, info.world_size)  # --grad_checkpointing, --compile
        if info.distributed:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            # the postfix text prompts never get a gradient (published quirk), hence find_unused_parameters
            self.model = torch.nn.parallel.DistributedDataParallel(self.core, find_unused_parameters=True,
                                                                   **ddp_kwargs)
        if args.do_train:
            self.loader = build_train_loader(args, self.train_ds, info)
            self.batches_per_epoch = len(self.loader)
        apply_auto_compile(self.core, args, self.batches_per_epoch * args.epochs if args.do_train else 0)
        total_steps = total_optimization_steps(self.batches_per_epoch, args.gradient_accumulation_steps, args.epochs)
        self.optimizer = build_optimizer(self.core.trainable_parameters(), args.lr, args.wd, args.coef_lr,
                                         (args.beta1, args.beta2), args.eps)
        self.schedule = WarmupCosineSchedule(args.lr, total_steps, args.warmup_proportion, args.wd)
        self.scaler = self.precision.make_scaler()

    def restore_state(self) -> None:
        """--resume without --load_from_pretrained: the progress (epoch, step, best, optimiser, scaler, RNG,
        results) of the checkpoint."""
        ckpt, args = self.resume_ckpt, self.args
        if ckpt is None or args.load_from_pretrained:
            return
        own = is_own_checkpoint(ckpt)
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
        self._record(evaluation_entry(res, tag, epoch, self.global_step, train_stats, self.left_out.get("test", {})))
        if final and args.save_sim_matrix:
            bank = self.bank_ds if self.bank_ds is not None else self.train_ds
            save_sim_matrices(args, self.model, res, bank, self.tokenizer, self.device, self.precision,
                              self.progress, self.out_dir, test_ds=self.test_ds)
        self.last = res
        return res

    def _record(self, entry: dict) -> None:
        """An evaluation into results.json and TensorBoard."""
        self.results["evaluations"].append(entry)
        if self.left_out:
            self.results["left_out"] = self.left_out
        if self.info.is_main:
            write_results(os.path.join(self.out_dir, "results.json"), self.results)
            if self.board is not None:
                vals = {f"{d}_{k}": entry[d][k] for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "MR", "MeanR")}
                self.board.scalars(vals, self.global_step, prefix="eval/")
                self.board.flush()

    # ---------------------------------------------------------------------------------- training
    def train(self) -> None:
        """Epochs start_epoch+1 .. stop: train (training/step.py), evaluate, save."""
        args = self.args
        stop = args.epochs if args.max_epochs_this_run is None else min(args.epochs,
                                                                         self.start_epoch + args.max_epochs_this_run)
        if self.start_epoch >= stop:
            return  # a finished run (restore_state said so)
        accumulation = args.gradient_accumulation_steps
        log.info("training: %d samples, %d processes x batch %d (micro-batch %d x %d accumulation), "
                 "%d optimiser steps per epoch, epochs %d..%d of %d, lr %g, %s", len(self.train_ds),
                 self.info.world_size, args.batch_size, args.batch_size // accumulation, accumulation,
                 self.batches_per_epoch // accumulation, self.start_epoch + 1, stop, args.epochs, args.lr,
                 args.precision)
        order_negatives = order_negatives_from_flags(args, self.core)
        for epoch in range(self.start_epoch, stop):
            self.loader.sampler.set_epoch(epoch)
            seed_all(args.seed + 1000 * (epoch + 1) + self.info.rank)
            stats = train_one_epoch(self.model, self.loader, self.optimizer, self.schedule, self.scaler,
                                    self.precision, args, epoch=epoch, global_step=self.global_step,
                                    device=self.device, board=self.board, progress=self.progress,
                                    order_negatives=order_negatives, step_losses=self.step_losses)
            self.global_step = stats["global_step"]
            res = self.evaluate("epoch", epoch + 1, stats, final=(epoch + 1 == stop))
            self.save(epoch + 1, res)
        if stop < args.epochs:
            log.info("stopped after epoch %d of %d (--max_epochs_this_run); continue with --resume %s",
                     stop, args.epochs, os.path.join(self.out_dir, CKPT))

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
                                       "schedule": self.schedule.state_dict(), "config": plain_config(self.args),
                                       "results": self.results,
                                       "attention_backends": attention_record(self.precision, self.device.type),
                                       "fp32_products": {"path": self.precision.fp32_path,
                                                         "device": self.device.type},
                                       "kernels": kernel_record(self.precision, self.device.type)})
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


def build_train_loader(args, train_ds, info) -> DataLoader:
    """Micro-batches of this process's share of the training set, reshuffled every epoch (``set_epoch``)."""
    micro_batch = args.batch_size // args.gradient_accumulation_steps
    if getattr(args, "batch_groups", 0):
        sampler = group_sampler(args, train_ds, info, micro_batch)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=micro_batch, sampler=sampler, drop_last=True,
                        num_workers=args.num_thread_reader, pin_memory=info.device.type == "cuda")
    if len(loader) < args.gradient_accumulation_steps:
        fail(f"the training set ({len(train_ds)} samples) is smaller than one global batch "
             f"({args.batch_size} x {info.world_size} processes); lower --batch_size")
    return loader


def group_sampler(args, train_ds, info, micro_batch: int):
    """--batch_groups: the rows of one 'group' in the same global batch (dataloaders/groups.py)."""
    from dataloaders.base import AnnotationError
    from dataloaders.groups import GroupBatchSampler

    if not hasattr(train_ds, "item_groups"):
        fail("--batch_groups needs --datatype custom (a 'group' column in --train_csv)")
    try:
        groups = train_ds.item_groups()
        sampler = GroupBatchSampler(groups, micro_batch, info.world_size, info.rank, args.seed,
                                    describe_batch=f" (--batch_size {args.batch_size} / "
                                    f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x "
                                    f"{info.world_size} processes)")
    except (AnnotationError, ValueError) as e:
        fail(str(e))
    log.info("--batch_groups: %d groups of the %d training items kept in one global batch of %d",
             len(sampler.members), len(groups), sampler.global_batch)
    return sampler


def load_init_weights(core, args) -> None:
    """--init_checkpoint: a new run from a checkpoint's prompts. Only the weights are taken (epoch 0, a
    new optimiser and schedule); the checkpoint's model flags must be this run's."""
    path = args.init_checkpoint
    ckpt = read_checkpoint(path, "--init_checkpoint")
    own = is_own_checkpoint(ckpt)
    mismatch = checkpoint_flag_mismatch(ckpt, args)
    if mismatch:
        fail(f"--init_checkpoint {path} was trained with {mismatch[0]} {mismatch[1]}; this run has "
             f"{mismatch[0]} {mismatch[2]} (the model flags must match the checkpoint: pass {mismatch[0]} "
             f"{mismatch[1]})")
    load_weights(core, ckpt, path, "--init_checkpoint")
    args._init_checkpoint_info = {"kind": "ours" if own else "official", "epoch": ckpt.get("epoch"),
                                  "global_step": ckpt.get("global_step")}
    log.info("[init] a new run from the weights of %s (%s checkpoint, trained %s epochs); optimiser, "
             "schedule and epochs start afresh", path, "our" if own else "official", ckpt.get("epoch"))


# ------------------------------------------------------------------------------------------ kernels
def choose_kernels(args, info, core, precision, resume_ckpt: dict | None) -> None:
    """Threads, then the kernels of each use (runtime.cpu: timed on this model at start-up, or those a
    --resume checkpoint recorded on this device type, without timing); one choice for all processes."""
    device = info.device
    given_path = getattr(args, "fp32_path", None)
    attention_flag = getattr(args, "attention_backend", "auto") or "auto"
    recorded = None
    if resume_ckpt is not None:
        recorded = recorded_kernels(resume_ckpt, device.type, given_path, attention_flag)
    apply_cpu_settings(args, device, core, precision, recorded=recorded)  # threads, BLAS, attention, bf16
    if given_path is not None and precision.fp32_path == given_path:
        precision.fp32_source = "--fp32_path"
    elif recorded is not None and precision.kernels is not None:
        precision.fp32_source = f"recorded in {args.resume}"
    if info.distributed:  # one choice for all processes: each measured its own
        use_rank0_kernels(args, device, core, precision)
        use_attention_backends(precision, rank0_attention_backends(precision), "rank 0's choice")
    recorded_attention = resume_ckpt.get("attention_backends") if resume_ckpt is not None else None
    if (attention_flag == "auto" and isinstance(recorded_attention, dict)
            and recorded_attention.get("device") == device.type):
        try:
            use_attention_backends(precision, recorded_attention, f"recorded in {args.resume}")
        except ValueError as e:
            log.warning("[resume] attention backends of the checkpoint not used: %s", e)


def use_rank0_kernels(args, device, core, precision) -> None:
    """Compute with rank 0's kernels in every process: a process whose own timing chose others applies the
    CPU settings again with rank 0's choices (no timing; oneDNN still only where exact here)."""
    if device.type != "cpu":
        return
    kernels = D.broadcast_object(precision.kernels)
    if kernels is None or kernels == precision.kernels:
        return
    restore_cpu_settings()
    apply_cpu_settings(args, device, core, precision, recorded=kernels)
    precision.fp32_source = "rank 0's choice"
