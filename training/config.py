"""Command-line flags of main.py (the published flag names) and their validation.

Every bad or contradictory flag is reported as ONE line on stderr (``main.py: error: ...``) with
exit status 2, before any model or data is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from runtime.compilation import compile_choice
from runtime.errors import OneLineArgumentParser, fail, finite_float, first_line
from runtime.model_flags import add_model_flags, model_flag_error

DATATYPES = ("msrvtt", "vatex", "lsmdc", "activity", "msvd", "didemo", "custom")
PRECISIONS = ("amp", "fp32", "bf16")


def _none_str(v):
    """'None', 'none' and '' mean "not given" (the published scripts pass resume=None)."""
    if v is None or str(v).strip() in ("", "None", "none", "null"):
        return None
    return v


def build_parser(prog: str = "main.py") -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=prog, description="DGL: train / evaluate prompt tuning of a frozen CLIP "
                                                     "for text-video retrieval")
    g = p.add_argument_group("run mode")
    g.add_argument("--do_train", type=int, default=None, choices=[0, 1],
                   help="train (default: 1 unless --do_eval 1 is given). --do_train 1 --do_eval 1: evaluate "
                        "before training, then train (evaluating after every epoch)")
    g.add_argument("--do_eval", type=int, default=0, choices=[0, 1],
                   help="evaluate; alone (or with --do_train 0) it only evaluates, e.g. --resume <checkpoint>")
    g.add_argument("--output_dir", type=str, required=True, help="checkpoints, logs, results.json, TensorBoard")
    g.add_argument("--config", type=str, default=None,
                   help="a run's config.json: a new run with exactly that run's settings, the flags given on the "
                        "command line overriding them (--output_dir must be given: a new folder)")
    g.add_argument("--resume", type=_none_str, default=None,
                   help="checkpoint to continue from (ours or an official DGL checkpoint)")
    g.add_argument("--load_from_pretrained", type=int, default=0, choices=[0, 1],
                   help="with --resume: load the weights only (not optimiser, epoch, step)")
    g.add_argument("--init_checkpoint", type=_none_str, default=None,
                   help="start a NEW run from the prompts of this DGL checkpoint (ours or an official one): "
                        "weights only, with a new optimiser, schedule and epoch count (fine-tuning); the model "
                        "flags must match the checkpoint. --resume continues a run instead")
    g.add_argument("--max_epochs_this_run", type=int, default=None,
                   help="stop after this many epochs in this invocation (continue later with --resume)")
    g.add_argument("--save_sim_matrix", action="store_true",
                   help="write the test similarity matrix (and train-query x test matrices for QB-norm) as .npy")
    g.add_argument("--qb_norm_train_queries", type=int, default=0,
                   help="with --save_sim_matrix: at most this many training captions/videos in the QB-norm "
                        "query bank (0 = all)")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no_tensorboard", action="store_true", help="do not write TensorBoard event files")
    g.add_argument("--debug", action="store_true", help="log at DEBUG level")
    g.add_argument("--no_progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an --output_dir that holds an earlier run: its files are removed first "
                        "(without it such a folder is refused; an evaluation never writes over checkpoints)")
    g.add_argument("--dsl", action="store_true",
                   help="also report dual-softmax (DSL) re-scored metrics, next to the plain ones; DSL uses every "
                        "test query at once (as TS2-Net / T-MASS report it)")
    g.add_argument("--dsl_temperature", type=finite_float, default=1.0,
                   help="DSL softmax temperature on the logit matrix (100 x cosine): 1 as published")
    g.add_argument("--order_metric", type=int, default=1, choices=[0, 1],
                   help="at every evaluation, the share of test captions whose video scores above the same video "
                        "with its frames reversed (and, with an 'order_twin' column, above the order-swapped "
                        "caption); costs one more pass over the test videos (0: skip it)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process (default: this process's cores minus the data-loader "
                        "workers; under torchrun the machine's cores are shared among its processes)")

    g = p.add_argument_group("CLIP and tokenizer")
    g.add_argument("--pretrained_dir", type=_none_str, default=None,
                   help="directory of the CLIP weights (default: $DGL_PRETRAINED_DIR)")
    g.add_argument("--pretrained_clip_name", type=str, default="ViT-B/32",
                   help="ViT-B/32 -> <pretrained_dir>/ViT-B-32.pt; or a file name / path")
    g.add_argument("--bpe_path", type=_none_str, default=None,
                   help="CLIP BPE vocabulary (default: <pretrained_dir>/bpe_simple_vocab_16e6.txt.gz, $DGL_BPE_PATH)")

    g = p.add_argument_group("data")
    g.add_argument("--datatype", type=str, default="msrvtt", choices=DATATYPES)
    g.add_argument("--data_path", type=_none_str, default=None)
    g.add_argument("--features_path", type=_none_str, default=None)
    g.add_argument("--train_csv", type=_none_str, default=None)
    g.add_argument("--val_csv", type=_none_str, default=None,
                   help="the test annotations (--datatype custom: a .csv, .tsv or .jsonl file of video, caption "
                        "[, start, end, video_id]; --train_csv is the training file of the same format)")
    g.add_argument("--clip_spans_to_video", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="--datatype custom: cut a start/end span that ends past the end of its video at the end "
                        "of the video (default: such a span is an error naming the file and row)")
    g.add_argument("--feature_framerate", type=int, default=1)
    g.add_argument("--expand_msrvtt_sentences", action="store_true")
    g.add_argument("--slice_framepos", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--train_frame_order", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--eval_frame_order", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--skip_bad_videos", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="leave out videos that are missing or empty at start-up (training and test, with their "
                        "captions; counted in the log and results.json) and test videos that fail to decode; a "
                        "training video that fails to decode later is replaced by the next readable one")
    g.add_argument("--num_thread_reader", type=int, default=None,
                   help="DataLoader workers per process (default: fitted with --threads to the cores; on CPU "
                        "0 below 4 cores, on CUDA all cores but one, at most 8)")
    g.add_argument("--resize_short_side", type=int, default=0, choices=[0, 1],
                   help="opt-in (changes results): scale each frame's short side to the model's input size "
                        "before the centre crop, for videos that were not preprocessed (the published "
                        "transform never resizes: it crops, or zero-pads, at the native resolution)")
    g.add_argument("--video_decoder", type=str, default="decord", choices=["decord", "pyav"],
                   help="decord (default: decodes only the sampled frames) or pyav (decodes every frame, as "
                        "the published code; the reference for exact reproduction)")
    g.add_argument("--frame_cache", type=str, default=None,
                   help="folder of decoded, cropped frames (python -m preprocess.frame_cache): videos it holds "
                        "unchanged are read from it instead of being decoded; same model input bit for bit "
                        "(raw cache) or within the JPEG tolerance (docs/data-loading.md)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=finite_float, default=1e-4)
    g.add_argument("--coef_lr", type=finite_float, default=1.0, help="lr multiplier of CLIP weights (frozen in DGL)")
    g.add_argument("--wd", type=finite_float, default=0.2)
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch_size", type=int, default=256,
                   help="per-process batch per optimiser step (split into --gradient_accumulation_steps parts)")
    g.add_argument("--batch_size_val", type=int, default=3500)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--warmup_proportion", type=finite_float, default=0.1)
    g.add_argument("--clip_grad_norm", type=finite_float, default=1.0, help="max gradient norm (0 = no clipping)")
    g.add_argument("--precision", type=str, default="fp32",
                   help="amp (CUDA fp16 autocast + GradScaler; bf16 autocast on CPU), fp32, bf16")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--n_display", type=int, default=100, help="log every n optimiser steps")
    g.add_argument("--optim", type=str, default="AdamW", help="AdamW (the only optimiser implemented)")
    g.add_argument("--beta1", type=finite_float, default=0.9)
    g.add_argument("--beta2", type=finite_float, default=0.98)
    g.add_argument("--eps", type=finite_float, default=1e-6)
    g.add_argument("--contrastive_chunk_size", type=int, default=0,
                   help="encode at most this many samples at once and cache the loss gradients (gradient "
                        "caching): the contrastive loss and gradients stay those of the whole batch of all "
                        "processes, on the memory of this chunk (0 = the whole micro-batch at once)")
    g.add_argument("--order_negatives", type=str, default="none", choices=["none", "reverse", "shuffle"],
                   help="opt-in (changes results): every training video is encoded again with its frames reversed "
                        "(or shuffled, a seeded permutation that is never the identity) and each copy is one more "
                        "text-to-video negative for every caption of the batch (TACT); about 1.5-2x the step time. "
                        "none: the published loss")
    g.add_argument("--order_negative_weight", type=finite_float, default=1.0,
                   help="alpha of the order negatives: log(alpha) is added to their logits (below 1 softens "
                        "captions that fit the reversed video too, e.g. 'a man stands')")
    g.add_argument("--batch_groups", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="--datatype custom: put the training rows of one 'group' (a column of --train_csv) in "
                        "the same global batch every epoch, e.g. a clip and its order-swapped twin")
    g.add_argument("--grad_checkpointing", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="recompute the vision blocks' activations in the backward pass instead of keeping "
                        "them (less memory, more compute; same results)")
    g.add_argument("--compile", type=compile_choice, nargs="?", const=1, default=0, choices=[0, 1, "auto"],
                   help="torch.compile the text and video encoders (training and evaluation; the first "
                        "calls compile, their time is logged; compiled shapes are cached under "
                        "~/.cache/dgl/torch-compile or $TORCHINDUCTOR_CACHE_DIR); auto = compile for training "
                        "runs of at least 500 training steps, else eager (one log line says which)")
    g.add_argument("--eval_precision", type=str, default=None, choices=["fp32", "bf16"],
                   help="precision of evaluation (default: bf16 with --precision bf16, else fp32); bf16 "
                        "encodes the videos with bf16 autocast (worth it on CPUs with AMX or AVX512-BF16)")
    g.add_argument("--cpu_tuning", type=int, default=1, choices=[0, 1],
                   help="on CPU, choose by measurement at start-up: fp32 products through oneDNN where it is "
                        "exact and faster, the faster attention backend, the frozen backbone stored in bf16 "
                        "with --precision bf16 (0: PyTorch's defaults)")

    g.add_argument("--fp32_path", type=str, default="auto", choices=["auto", "onednn", "mkl"],
                   help="CPU fp32 matrix products: auto = oneDNN where a check shows it exact and a timing faster "
                        "(with --cpu_tuning 1), or the path recorded in the --resume checkpoint; onednn (where "
                        "exact) / mkl = that path on every run, whatever a timing would say")
    g.add_argument("--attention_backend", type=str, default="auto", choices=["auto", "math", "flash"],
                   help="attention kernel for training and evaluation: auto = on CPU the faster one, measured at "
                        "start-up (with --cpu_tuning 1), or the one recorded in the --resume checkpoint; math / "
                        "flash = that kernel on every run (the two round differently in the last digits)")

    g = p.add_argument_group("model (DGL)")
    add_model_flags(g)  # one flag per DGLConfig field: its default, choices, bounds and help
    g.add_argument("--freeze_clip", type=int, default=1, help="must be 1: the CLIP backbone is frozen")

    g = p.add_argument_group("distributed (use torchrun; these exist for the published scripts)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    g.add_argument("--dist_backend", type=str, default="auto", choices=["auto", "nccl", "gloo"])
    g.add_argument("--init_method", type=str, default=None, help="ignored: torchrun sets the rendezvous")
    g.add_argument("--world_size", type=int, default=None, help="ignored: torchrun sets it")
    g.add_argument("--n_gpu", type=int, default=None, help="ignored")
    g.add_argument("--gpu", type=int, default=None, help="single-process run on this CUDA device")
    g.add_argument("--dp", action="store_true", help="not supported (use torchrun)")
    g.add_argument("--multigpu", type=str, default=None, help="not supported (use torchrun)")
    g.add_argument("--remote", type=int, default=0)

    g = p.add_argument_group("published flags accepted without effect (or with their only supported value)")
    for name in ("--data_dir", "--cache_dir", "--cross_model", "--lr_decay", "--video_dim", "--margin",
                 "--hard_negative_rate", "--negative_weighting", "--n_pair", "--freeze_layer_num",
                 "--text_num_hidden_layers", "--visual_num_hidden_layers", "--cross_num_hidden_layers",
                 "--tfm_heads", "--tfm_layers"):
        g.add_argument(name, type=str, default=None, help=argparse.SUPPRESS)
    for name in ("--loose_type", "--do_lower_case", "--use_mil", "--sampled_use_mil", "--use-bn-sync"):
        g.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--do_pretrain", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--linear_patch", type=str, default="2d", help=argparse.SUPPRESS)
    g.add_argument("--sim_header", type=str, default="meanP", help=argparse.SUPPRESS)
    g.add_argument("--task_type", type=str, default="retrieval", help=argparse.SUPPRESS)
    g.add_argument("--temperature_new", type=finite_float, default=1.0, help=argparse.SUPPRESS)
    g.add_argument("--time_embedding", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--camoe_dsl", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--pre_norm", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--inference_speed_test", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--lmdb_dataset", type=_none_str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--save_feature_path", type=_none_str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--init_model", type=_none_str, default=None, help=argparse.SUPPRESS)
    return p


def validate(args, parser) -> argparse.Namespace:
    """Resolve defaults and reject bad or contradictory combinations (one line each)."""
    err = parser.error
    # run mode
    if args.do_train is None:
        args.do_train = 0 if args.do_eval else 1
    if not args.do_train and not args.do_eval:
        err("nothing to do: --do_train 0 and --do_eval 0")
    if args.do_pretrain:
        err("--do_pretrain is not supported (DGL only fine-tunes prompts for retrieval)")
    for flag, path in (("--resume", args.resume), ("--init_checkpoint", getattr(args, "init_checkpoint", None))):
        if path is not None and os.path.isdir(path):
            err(f"{flag} {path} is a folder; give its checkpoint file (e.g. {os.path.join(path, 'ckpt.pth.tar')})")
    if args.resume is not None and not os.path.isfile(args.resume):
        err(f"--resume checkpoint not found: {args.resume}")
    if args.init_checkpoint is not None:
        if args.resume is not None:
            err("--init_checkpoint starts a new run from a checkpoint's weights, --resume continues a run: "
                "give one of them")
        if not os.path.isfile(args.init_checkpoint):
            err(f"--init_checkpoint checkpoint not found: {args.init_checkpoint}")
        if not args.do_train:
            err("--init_checkpoint is for training (fine-tuning); to evaluate a checkpoint use --resume")
        inside = os.path.abspath(args.init_checkpoint).startswith(os.path.abspath(args.output_dir) + os.sep)
        if inside and args.overwrite_output_dir:
            err(f"--init_checkpoint {args.init_checkpoint} lies in --output_dir {args.output_dir}, which "
                "--overwrite_output_dir empties first: copy the checkpoint elsewhere or pass another --output_dir")
    if args.load_from_pretrained and args.resume is None:
        err("--load_from_pretrained 1 needs --resume <checkpoint>")
    if args.max_epochs_this_run is not None and args.max_epochs_this_run < 1:
        err("--max_epochs_this_run must be >= 1")
    if args.qb_norm_train_queries < 0:
        err("--qb_norm_train_queries must be >= 0")
    if args.qb_norm_train_queries and not args.save_sim_matrix:
        err("--qb_norm_train_queries caps the QB-norm query bank that --save_sim_matrix writes; without "
            "--save_sim_matrix it does nothing: add --save_sim_matrix")
    if args.dsl_temperature <= 0:
        err("--dsl_temperature must be > 0")
    # precision / optimiser
    if args.precision == "fp16":
        err("--precision fp16 (pure half weights) is not supported; use --precision amp (fp16 autocast) or bf16")
    if args.precision not in PRECISIONS:
        err(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    if args.optim != "AdamW":
        err(f"--optim {args.optim} is not implemented; DGL's scripts use --optim AdamW")
    if args.lr <= 0:
        err("--lr must be > 0")
    if args.coef_lr < 0:
        err("--coef_lr must be >= 0")
    if args.wd < 0:
        err("--wd must be >= 0")
    if args.epochs < 1:
        err("--epochs must be >= 1")
    if args.batch_size < 1 or args.batch_size_val < 1:
        err("--batch_size and --batch_size_val must be >= 1")
    if args.gradient_accumulation_steps < 1:
        err("--gradient_accumulation_steps must be >= 1")
    if args.batch_size % args.gradient_accumulation_steps:
        err(f"--batch_size {args.batch_size} is not divisible by --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        err("--warmup_proportion must be in [0, 1)")
    if args.clip_grad_norm is not None and args.clip_grad_norm < 0:
        err("--clip_grad_norm must be >= 0 (0 disables clipping)")
    if args.contrastive_chunk_size < 0:
        err("--contrastive_chunk_size must be >= 0 (0 = the whole micro-batch at once)")
    if args.order_negatives != "none":
        if not args.order_negative_weight > 0:
            err(f"--order_negative_weight must be > 0, got {args.order_negative_weight}")
        if args.max_frames < 2:
            err(f"--order_negatives {args.order_negatives} needs at least 2 frames per video to reorder; "
                f"--max_frames is {args.max_frames}")
    if args.batch_groups and args.datatype != "custom":
        err("--batch_groups needs --datatype custom (a 'group' column in --train_csv)")
    if args.fp32_path == "auto":
        args.fp32_path = None  # chosen at start-up (runtime.cpu), or the --resume checkpoint's
    if args.n_display < 1:
        err("--n_display must be >= 1")
    if args.num_thread_reader is not None and args.num_thread_reader < 0:
        err("--num_thread_reader must be >= 0")
    if args.threads is not None and args.threads < 1:
        err("--threads must be >= 1")
    if not (0.0 <= args.beta1 < 1.0 and 0.0 <= args.beta2 < 1.0) or args.eps <= 0:
        err("need 0 <= --beta1, --beta2 < 1 and --eps > 0")
    # model
    if args.freeze_clip != 1:
        err("--freeze_clip must be 1: DGL trains prompts on a frozen CLIP (fine-tuning CLIP is not implemented)")
    problem = model_flag_error(args)  # DGLConfig's check, the one every program makes
    if problem:
        err(problem)
    # distributed / devices
    if args.dp or args.multigpu:
        err("--dp / --multigpu (DataParallel) are not supported; launch with torchrun --nproc_per_node N")
    if args.remote:
        err("--remote is not supported; launch with torchrun")
    if args.device == "cuda" or args.gpu is not None:
        import torch
        if not torch.cuda.is_available():
            err("CUDA was requested (--device cuda / --gpu) but no CUDA device is available")
    if args.dist_backend == "nccl" and args.device == "cpu":
        err("--dist_backend nccl needs GPUs; use gloo (the default on CPU)")
    # published flags with a single supported value
    fixed = {"linear_patch": "2d", "sim_header": "meanP", "task_type": "retrieval", "time_embedding": 0,
             "camoe_dsl": 0, "pre_norm": 0, "inference_speed_test": 0, "temperature_new": 1.0}
    for name, value in fixed.items():
        if getattr(args, name) != value:
            err(f"--{name} {getattr(args, name)} is not supported by DGL (only {value})")
    for name in ("lmdb_dataset", "save_feature_path", "init_model"):
        if getattr(args, name) is not None:
            err(f"--{name} is not supported; use --features_path (videos) / --resume (weights)")
    # paths
    if args.pretrained_dir is None:
        args.pretrained_dir = os.environ.get("DGL_PRETRAINED_DIR")
    if args.datatype == "custom":
        if args.val_csv is None:
            err("--datatype custom needs --val_csv <test annotation file (.csv, .tsv or .jsonl)>")
        if args.do_train and args.train_csv is None:
            err("training on --datatype custom needs --train_csv <annotation file (.csv, .tsv or .jsonl)>")
        if args.features_path is None:
            err("--datatype custom needs --features_path <the folder the 'video' paths are relative to>")
        from dataloaders.base import AnnotationError
        from dataloaders.custom import annotation_format
        for flag, path in (("--train_csv", args.train_csv), ("--val_csv", args.val_csv)):
            try:
                if path is not None:
                    annotation_format(path, flag)
            except AnnotationError as e:
                err(str(e))
    if args.do_train and args.datatype == "msrvtt" and args.train_csv is None:
        err("training on msrvtt needs --train_csv (e.g. MSRVTT_train.9k.csv)")
    from runtime.cpu import resolve_core_split
    resolve_core_split(args)  # --threads and --num_thread_reader fitted to this process's cores
    return args


# Flags that name files or folders: a replayed run (--config) names those that no longer exist before it starts.
PATH_FLAGS = ("data_path", "features_path", "train_csv", "val_csv", "resume", "init_checkpoint", "pretrained_dir",
              "bpe_path", "frame_cache")
# What config.json records besides the flags: found by the run (the CLIP file, the model's input size).
RECORDED_NOT_FLAGS = ("clip_path", "image_resolution")
# Flags a replay never takes from the record: where the new run writes, whether it may remove a run there, and
# the record it was itself replayed from.
NOT_REPLAYED = ("output_dir", "overwrite_output_dir", "config")


def parse_args(argv=None, prog: str = "main.py") -> argparse.Namespace:
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]

    def given(flag: str) -> bool:
        return any(t == flag or t.startswith(flag + "=") for t in argv)

    if given("--config") and not given("--output_dir"):
        parser.error("--config replays a run into a new folder: give --output_dir (the recorded one holds that run)")
    args = parser.parse_args(argv)
    recorded = {}
    if args.config is not None:
        recorded = read_run_config(args.config, parser)
        parser.set_defaults(**recorded)
        args = parser.parse_args(argv)  # the flags given on the command line override the record
    if recorded:
        missing = [f"--{name} {recorded[name]}" for name in PATH_FLAGS
                   if recorded.get(name) is not None and getattr(args, name) == recorded[name]
                   and not os.path.exists(recorded[name])]
        if missing:
            parser.error(f"--config {args.config}: these paths no longer exist: {', '.join(missing)} (give each "
                         "anew after --config)")
    return validate(args, parser)


def read_run_config(path: str, parser) -> dict:
    """The flags a run's config.json records, as values of this parser's flags (one-line error, status 2, for
    a file that cannot be read, a key that is no flag, or a value no flag takes)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({os.strerror(e.errno).lower() if e.errno else e})")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        parser.error(f"--config {path} is not a run's config.json ({first_line(e)})")
    if not isinstance(data, dict):
        parser.error(f"--config {path} is not a run's config.json (it holds a JSON {type(data).__name__})")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(k for k in data if k not in actions and k not in RECORDED_NOT_FLAGS)
    if unknown:
        parser.error(f"--config {path}: unknown or removed settings: {', '.join(unknown)} (this main.py has no "
                     "such flags; remove them from the file)")
    values, bad = {}, []
    for name, value in data.items():
        if name in RECORDED_NOT_FLAGS or name in NOT_REPLAYED:
            continue
        problem, values[name] = _recorded_value(actions[name], value)
        if problem:
            bad.append(f"{name} {json.dumps(value)} ({problem})")
    if bad:
        parser.error(f"--config {path}: values the flags do not take: {'; '.join(bad)}")
    return values


def _recorded_value(action: argparse.Action, value):
    """(problem or None, the value for ``action``) of a value config.json records for the flag ``action``."""
    if action.dest == "fp32_path" and value is None:
        return None, "auto"  # validate() records "auto" as None (chosen at start-up)
    if value is None:
        return (None if action.default is None else "a value is needed"), value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return (None if isinstance(value, bool) else "true or false"), value
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer", value
    elif action.type is finite_float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number", value
        try:
            value = finite_float(value)
        except argparse.ArgumentTypeError as e:
            return str(e), value
    elif action.type not in (None, str):  # a flag with its own parser (e.g. --compile 0|1|auto)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return "a value its flag reads", value
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            return str(e), value
    elif not isinstance(value, str):
        return "a string", value
    if action.choices is not None and value not in action.choices:
        return f"one of {', '.join(map(str, action.choices))}", value
    return None, value


def resolve_clip_path(args) -> str:
    name = args.pretrained_clip_name
    candidates = []
    if os.path.isfile(name):
        return name
    fname = name.replace("/", "-")
    if not os.path.splitext(fname)[1]:
        fname += ".pt"
    if args.pretrained_dir:
        candidates.append(os.path.join(args.pretrained_dir, fname))
        candidates.append(os.path.join(args.pretrained_dir, name))
    for c in candidates:
        if os.path.isfile(c):
            return c
    where = candidates[0] if candidates else fname
    fail(f"CLIP weights '{name}' not found (looked for {where}); pass --pretrained_dir <dir with {fname}> "
         "or set DGL_PRETRAINED_DIR")


def config_to_json(args, path: str) -> None:
    from runtime.files import atomic_write_text
    data = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
