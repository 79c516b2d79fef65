"""The embedded demo (scripts/demo.sh): synthetic videos -> a tiny CLIP pre-trained on single frames,
then frozen -> DGL's prompts trained on CPU -> a table of what each model learnt: text-to-video R@1/R@5
and an order probe, for the frozen CLIP alone (zero-shot), DGL-Transformer with order negatives (reversed
clips as extra negatives, each clip batched with its order-swapped twin) and (--compare) DGL-Transformer
without them and DGL-Linear.

    python -m demo [--out demo_output] [--epochs 7] [--num_train 480] [--num_test 60] [--compare]

Everything it needs is made here: the synthetic MSR-VTT-layout dataset (captions about motion and
order: "a red square moves left then up"), a tiny CLIP in the OpenAI state-dict format given a short
image-text pre-training on single frames (real weights cannot be downloaded everywhere) and, when
CLIP's BPE file is not found, a small BPE vocabulary learnt from the captions. Data and pre-trained
CLIP are kept per configuration and reused on reruns.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# What the generator writes for the demo; a data folder written by another version is regenerated.
DATA_VERSION = 2
DATA_MANIFEST = "demo_data.json"
DEFAULTS = {"num_train": 480, "num_test": 60, "num_val": 60, "seed": 0, "max_frames": 4}
IMAGE_SIZE = 32
MAX_WORDS = 16
# Kernels main.py computes with, fixed rather than timed at start-up: a timing on a busy machine can pick
# another attention backend or fp32 product path, which round differently, and a rerun would not repeat.
FIXED_KERNELS = ("--attention_backend", "math", "--fp32_path", "mkl")


def _default_bpe_candidates(pretrained_dir: str | None) -> list[str]:
    c = []
    if pretrained_dir:
        c.append(os.path.join(pretrained_dir, BPE_NAME))
    if os.environ.get("DGL_BPE_PATH"):
        c.append(os.environ["DGL_BPE_PATH"])
    shared = os.environ.get("DGL_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
    c.append(os.path.join(shared, "data", "clip", BPE_NAME))
    return c


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (main.py, QB-norm)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_parser():
    from runtime.errors import OneLineArgumentParser, finite_float

    p = OneLineArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_output", help="everything goes here (default: demo_output)")
    p.add_argument("--pretrained_dir", default=None, help="use CLIP's BPE file from here when present")
    p.add_argument("--num_train", type=int, default=DEFAULTS["num_train"])
    p.add_argument("--num_test", type=int, default=DEFAULTS["num_test"])
    p.add_argument("--num_val", type=int, default=DEFAULTS["num_val"],
                   help="validation clips, for choosing settings with --eval_on val (default 60)")
    p.add_argument("--epochs", type=int, default=7,
                   help="training epochs of each run (default 7, chosen on the validation clips)")
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--lr", type=finite_float, default=1e-2)
    p.add_argument("--max_frames", type=int, default=DEFAULTS["max_frames"],
                   help="frames per clip, all of them seen by the model (even: two moves of equal length)")
    p.add_argument("--shared_latent_space", default="transformer", choices=["transformer", "linear"],
                   help="the latent space of the default run (--compare trains the other one too)")
    p.add_argument("--frame_prompts", type=int, default=8,
                   help="local prompts per frame (P); the text gets 2P prompts (default 8)")
    p.add_argument("--global_prompts", type=int, default=4,
                   help="global visual prompts, which attend to every frame (default 4)")
    p.add_argument("--order_negatives", default="reverse", choices=["none", "reverse", "shuffle"],
                   help="order negatives of the default run (main.py --order_negatives; default reverse)")
    p.add_argument("--order_negative_weight", type=finite_float, default=1.0,
                   help="their weight (main.py --order_negative_weight; default 1)")
    p.add_argument("--batch_groups", type=int, default=1, choices=[0, 1],
                   help="with order negatives, put each training caption in the same batch as the same caption "
                        "of an order-swapped twin clip (main.py --batch_groups; default 1)")
    p.add_argument("--compare", action="store_true",
                   help="also train the same latent space without order negatives, and DGL-Linear, with the same "
                        "settings, and add them to the table")
    p.add_argument("--retrain", action="store_true",
                   help="train every run again, even one already trained with the same settings (a rerun reuses "
                        "a finished run whose main.py command, data and CLIP file are unchanged)")
    p.add_argument("--eval_on", default="test", choices=["test", "val"],
                   help="evaluate (and print the table) on the test clips or on the validation clips")
    p.add_argument("--run_name", default=None,
                   help="name the run folders <run_name>_run, <run_name>_run_plain, <run_name>_run_linear "
                        "(default: run, run_plain, run_linear)")
    p.add_argument("--pretrain_steps", type=int, default=200,
                   help="image-text pre-training steps of the tiny CLIP on single frames (0: random CLIP)")
    p.add_argument("--pretrain_lr", type=finite_float, default=1e-3)
    p.add_argument("--clip_layers", type=int, default=3,
                   help="layers of each of the tiny CLIP's frozen towers (vision and text), all of them "
                        "prompted by DGL (default 3)")
    p.add_argument("--own_vocab", action="store_true", help="always learn the small BPE vocabulary")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, passed on to main.py (default: the cores minus the data-loader workers)")
    p.add_argument("--eval_precision", default=None, choices=["fp32", "bf16"],
                   help="passed on to main.py: bf16 encodes the test videos with bf16 autocast")
    p.add_argument("--prepare_only", action="store_true",
                   help="only write the dataset, the vocabulary and the pre-trained tiny CLIP (e.g. to "
                        "smoke-test scripts/msrvtt.sh on CPU), then print the environment to use them")
    return p


# ------------------------------------------------------------------------------------------------ data
def data_config(args) -> dict:
    return {"version": DATA_VERSION, "num_train": args.num_train, "num_test": args.num_test,
            "num_val": args.num_val, "seed": args.seed, "frames": args.max_frames, "size": IMAGE_SIZE,
            "motion": "from_centre"}


def data_tag(cfg: dict) -> str:
    return f"{cfg['num_train']}-{cfg['num_test']}-{cfg['num_val']}-s{cfg['seed']}-f{cfg['frames']}"


def data_folder(out: str, cfg: dict) -> str:
    """``data`` for the default configuration, ``data-<train>-<test>-<val>-s<seed>-f<frames>`` for any
    other: two configurations never share a folder, so a smaller smoke-test dataset cannot replace the
    one a demo run and its search index were built on."""
    default = (cfg["frames"] == DEFAULTS["max_frames"]
               and all(cfg[k] == DEFAULTS[k] for k in ("num_train", "num_test", "num_val", "seed")))
    return os.path.join(out, "data" if default else "data-" + data_tag(cfg))


def dataset_paths(root: str) -> dict:
    return {"root": root,
            "train_csv": os.path.join(root, "MSRVTT_train.9k.csv"),
            "val_csv": os.path.join(root, "MSRVTT_JSFUSION_test.csv"),
            "heldout_csv": os.path.join(root, "MSRVTT_val.csv"),
            "data_path": os.path.join(root, "MSRVTT_data.json"),
            "probe_csv": os.path.join(root, "order_probe.csv"),
            "features_path": os.path.join(root, "videos"),
            "train_table": os.path.join(root, "train.csv"),
            "test_table": os.path.join(root, "test.csv"),
            "val_table": os.path.join(root, "val.csv")}


def _count_rows(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) - 1


def dataset_matches(root: str, cfg: dict) -> bool:
    """True when ``root`` holds exactly the dataset ``cfg`` asks for: the manifest written after the
    last file, the annotation files' row counts and one video file per clip, no more."""
    paths = dataset_paths(root)
    try:
        with open(os.path.join(root, DATA_MANIFEST), encoding="utf-8") as f:
            if json.load(f) != cfg:
                return False
        counts = {"train_csv": cfg["num_train"], "val_csv": cfg["num_test"]}
        if cfg["num_val"]:
            counts["heldout_csv"] = cfg["num_val"]
        if any(_count_rows(paths[k]) != n for k, n in counts.items()):
            return False
        if _count_rows(paths["probe_csv"]) != cfg["num_test"] + cfg["num_val"]:
            return False
        with open(paths["data_path"], encoding="utf-8") as f:
            videos = json.load(f)["videos"]
        expected = {v["video_id"] + ".mp4" for v in videos}
        total = cfg["num_train"] + cfg["num_test"] + cfg["num_val"]
        return len(videos) == total and set(os.listdir(paths["features_path"])) == expected
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_data(out: str, cfg: dict) -> dict:
    """The dataset ``cfg`` asks for, in its own folder; regenerated whenever the files do not match."""
    from preprocess.make_synthetic_dataset import make_synthetic_dataset
    from runtime.files import atomic_write_text

    root = data_folder(out, cfg)
    if dataset_matches(root, cfg):
        print(f"[demo] using the synthetic dataset in {root}", flush=True)
        return dataset_paths(root)
    print(f"[demo] writing the synthetic dataset to {root} ...", flush=True)
    if os.path.isdir(root):  # another version's or an interrupted folder: start it over
        shutil.rmtree(root)
    make_synthetic_dataset(root, num_train=cfg["num_train"], num_test=cfg["num_test"], num_val=cfg["num_val"],
                           seed=cfg["seed"], size=cfg["size"], min_frames=cfg["frames"], max_frames=cfg["frames"],
                           motion=cfg["motion"])
    atomic_write_text(os.path.join(root, DATA_MANIFEST), json.dumps(cfg, indent=1))
    return dataset_paths(root)


def write_custom_tables(paths: dict) -> None:
    """The dataset as main.py's custom tables (--datatype custom): ``train.csv`` (video, caption, group: each
    caption grouped with the same caption template of one order-swapped twin clip, for --batch_groups),
    ``test.csv`` and ``val.csv`` (video, caption, order_twin: the caption with its two moves swapped, for the
    order metric). Written from MSRVTT_data.json and order_probe.csv; unchanged files are not rewritten."""
    import csv
    import io

    from demo.pretrain import read_specs
    from runtime.files import atomic_write_text

    with open(paths["data_path"], encoding="utf-8") as f:
        sentences = json.load(f)["sentences"]
    captions: dict[str, list[str]] = {}
    for s in sentences:
        captions.setdefault(s["video_id"], []).append(s["caption"])
    specs = read_specs(paths["data_path"], "train")
    # pair each clip with one twin (same colour and shape, the two moves in the other order)
    waiting: dict[tuple, list[str]] = {}
    partner: dict[str, str] = {}
    for spec in specs:
        twin_key = (spec.colour, spec.shape, spec.second, spec.first)
        if waiting.get(twin_key):
            other = waiting[twin_key].pop(0)
            partner[spec.video_id], partner[other] = other, spec.video_id
        else:
            waiting.setdefault((spec.colour, spec.shape, spec.first, spec.second), []).append(spec.video_id)

    def table(header, rows) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()

    rows = []
    for spec in specs:
        first = min(spec.video_id, partner.get(spec.video_id, spec.video_id), key=lambda v: int(v[5:]))
        rows += [(spec.video_id + ".mp4", c, f"{first}-{k}") for k, c in enumerate(captions[spec.video_id])]
    files = {"train_table": table(("video", "caption", "group"), rows)}
    with open(paths["probe_csv"], newline="", encoding="utf-8") as f:
        probe = list(csv.DictReader(f))
    for split in ("test", "val"):
        files[f"{split}_table"] = table(("video", "caption", "order_twin"),
                                        [(r["video_id"] + ".mp4", r["caption"], r["swapped"])
                                         for r in probe if r["split"] == split])
    for key, text in files.items():
        try:
            with open(paths[key], encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        atomic_write_text(paths[key], text)


def prepare_frame_cache(paths: dict, max_frames: int) -> str:
    """Every frame of the dataset's clips decoded once, as main.py's loader crops them (raw uint8, so the
    model input is the same bit for bit): ``main.py --frame_cache`` reads them instead of decoding the
    videos every epoch. Built incrementally: a rerun finds every clip cached and writes nothing."""
    from preprocess.frame_cache import build_frame_cache, find_videos

    cache = os.path.join(paths["root"], "frame_cache")
    build_frame_cache(cache, find_videos([paths["features_path"]]), frames="all", max_frames=max_frames,
                      size=IMAGE_SIZE, log=lambda m: print("[demo] " + m, flush=True))
    return cache


def _all_captions(data_json: str) -> list[str]:
    from demo.pretrain import read_specs
    from preprocess.make_synthetic_dataset import frame_caption

    with open(data_json, encoding="utf-8") as f:
        captions = [s["caption"] for s in json.load(f)["sentences"]]
    frames = sorted({frame_caption(s, t) for s in read_specs(data_json, "train") for t in range(s.num_frames)})
    return captions + frames


# ------------------------------------------------------------------------------------------------ CLIP
def clip_file_name(vocab_size: int, cfg: dict, args) -> str:
    """The pre-trained CLIP's name says what it was made from: vocabulary size, data, steps, lr, seed."""
    layers = f"-l{args.clip_layers}"
    if args.pretrain_steps == 0:
        return f"tiny-clip-v{vocab_size}{layers}-random-s{args.seed}.pt"
    return (f"tiny-clip-v{vocab_size}{layers}-frames{data_tag(cfg)}-pt{args.pretrain_steps}"
            f"-lr{args.pretrain_lr:g}-s{args.seed}.pt")


def prepare_clip(clip_path: str, tokenizer, paths: dict, args) -> None:
    import torch

    from demo.pretrain import (
        frame_caption_accuracy,
        load_frames,
        pretrain_clip,
        read_specs,
        save_clip,
    )
    from modules.clip import CLIP, tiny_clip_config

    torch.manual_seed(args.seed)
    clip = CLIP(tiny_clip_config(vocab_size=tokenizer.vocab_size, image_resolution=IMAGE_SIZE,
                                 context_length=77, vision_layers=args.clip_layers,
                                 transformer_layers=args.clip_layers))
    if args.pretrain_steps:
        t = time.time()
        specs = read_specs(paths["data_path"], "train")
        images, captions = load_frames(specs, paths["features_path"], IMAGE_SIZE)
        print(f"[demo] pre-training the tiny CLIP on {len(captions)} single frames of the {len(specs)} training "
              f"clips ({args.pretrain_steps} steps) ...", flush=True)
        before = frame_caption_accuracy(clip, tokenizer, images, captions)
        pretrain_clip(clip, tokenizer, images, captions, steps=args.pretrain_steps, lr=args.pretrain_lr,
                      seed=args.seed, log=lambda m: print("[demo] " + m, flush=True))
        after = frame_caption_accuracy(clip, tokenizer, images, captions)
        print(f"[demo] frame-caption retrieval (training frames): {100 * before:.1f}% at random init, "
              f"{100 * after:.1f}% after pre-training ({time.time() - t:.0f}s)", flush=True)
    save_clip(clip, clip_path)


# ------------------------------------------------------------------------------------------------ runs
def run_folder(out: str, cfg: dict, latent: str, eval_on: str, name: str | None = None) -> str:
    name = name or ("run" if latent == "transformer" else "run_linear")
    if os.path.basename(data_folder(out, cfg)) != "data":
        name += "-" + data_tag(cfg)
    if eval_on != "test":
        name += "-" + eval_on
    return os.path.join(out, name)


def main_py_command(args, latent: str, paths: dict, eval_table: str, pre_dir: str, clip_name: str, bpe: str,
                    run_dir: str, order_negatives: str = "none") -> list[str]:
    """The main.py command line of one demo run (``order_negatives``: that run's --order_negatives)."""
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--do_train", "1", "--do_eval", "1",
           "--datatype", "custom", "--train_csv", paths["train_table"], "--val_csv", eval_table,
           "--features_path", paths["features_path"],
           "--expand_msrvtt_sentences", "--feature_framerate", "3", "--slice_framepos", "2",
           "--max_words", str(MAX_WORDS), "--max_frames", str(args.max_frames),
           "--pretrained_dir", pre_dir, "--pretrained_clip_name", clip_name, "--bpe_path", bpe,
           "--shared_latent_space", latent, "--text_prompt_length", str(2 * args.frame_prompts),
           "--local_each_frame_prompt_length", str(args.frame_prompts), "--global_visual_prompt_length", str(args.global_prompts),
           "--unified_transformer_layers", str(args.clip_layers), "--freeze_clip", "1",
           "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--batch_size_val", "32",
           "--lr", str(args.lr), "--wd", "0.2", "--warmup_proportion", "0.1", "--clip_grad_norm", "1.0",
           "--precision", "fp32", "--seed", str(args.seed), "--n_display", "10",
           "--device", "cpu", "--save_sim_matrix", "--frame_cache", paths["frame_cache"], "--output_dir", run_dir,
           "--overwrite_output_dir", *FIXED_KERNELS]  # a second demo starts its run over
    if order_negatives != "none":
        cmd += ["--order_negatives", order_negatives, "--order_negative_weight", str(args.order_negative_weight)]
        if args.batch_groups:
            cmd += ["--batch_groups"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.eval_precision:
        cmd += ["--eval_precision", args.eval_precision]
    return cmd


RUN_RECORD = "demo_run.json"


def run_record(cmd: list[str], paths: dict, clip_path: str) -> dict:
    """What a demo run was trained from: main.py's arguments (the interpreter aside) and the identity of the
    data and of the pre-trained CLIP file (regenerated files have new modification times)."""
    def identity(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    return {"main_py": cmd[1:], "data": identity(os.path.join(paths["root"], DATA_MANIFEST)),
            "clip": identity(clip_path)}


def finished_run(folder: str, record: dict) -> bool:
    """True when ``folder`` holds a run that finished with exactly ``record``'s settings: its record (written
    after main.py succeeded), final checkpoint and results are all there."""
    try:
        with open(os.path.join(folder, RUN_RECORD), encoding="utf-8") as f:
            if json.load(f) != record:
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(folder, n)) for n in ("ckpt.pth.tar", "results.json"))


def train_dgl(cmd: list[str], folder: str, record: dict, retrain: bool) -> int:
    """Train and evaluate one run with main.py, or reuse the finished run with the same record."""
    from runtime.files import atomic_write_text

    if not retrain and finished_run(folder, record):
        print(f"[demo] {folder}: already trained with these settings, reused (--retrain trains it again)",
              flush=True)
        return 0
    try:  # the record goes first: an interrupted or failed run is never taken for a finished one
        os.remove(os.path.join(folder, RUN_RECORD))
    except FileNotFoundError:
        pass
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=REPO, check=False)
    if r.returncode != 0:
        print(f"[demo] main.py failed with exit status {r.returncode}", file=sys.stderr)
        return r.returncode
    atomic_write_text(os.path.join(folder, RUN_RECORD), json.dumps(record, indent=1))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_frames < 2 or args.max_frames % 2:
        parser.error(f"--max_frames must be even and at least 2 (two moves of equal length), got {args.max_frames}")
    for name in ("num_train", "num_test", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.frame_prompts < 1 or args.clip_layers < 1 or args.global_prompts < 1:
        parser.error("--frame_prompts, --clip_layers and --global_prompts must be at least 1")
    if args.num_val < 0 or args.pretrain_steps < 0:
        parser.error("--num_val and --pretrain_steps must not be negative")
    if args.eval_on == "val" and not args.num_val:
        parser.error("--eval_on val needs validation clips (--num_val > 0)")
    t0, c0 = time.time(), _cpu_seconds()
    out = os.path.abspath(args.out)
    pre_dir = os.path.join(out, "pretrained")
    os.makedirs(pre_dir, exist_ok=True)

    import torch

    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. data: a folder per configuration
    cfg = data_config(args)
    paths = prepare_data(out, cfg)
    write_custom_tables(paths)
    paths["frame_cache"] = prepare_frame_cache(paths, args.max_frames)

    # 2. BPE vocabulary
    bpe = None if args.own_vocab else next((c for c in _default_bpe_candidates(args.pretrained_dir)
                                            if os.path.isfile(c)), None)
    if bpe is None:
        bpe = os.path.join(pre_dir, BPE_NAME)
        if not os.path.isfile(bpe):
            print("[demo] CLIP's BPE file not found: learning a small BPE vocabulary from the captions", flush=True)
            write_bpe_vocab(_all_captions(paths["data_path"]), bpe, num_merges=300)
        vocab_note = "a small BPE vocabulary learnt from the captions"
    else:
        vocab_note = "CLIP's BPE vocabulary"
    tok = get_tokenizer(bpe_path=bpe)
    print(f"[demo] tokenizer: {bpe} ({tok.vocab_size} tokens, {vocab_note})", flush=True)

    # 3. the tiny CLIP, pre-trained on single frames, in the OpenAI state-dict format; reused on reruns
    clip_name = clip_file_name(tok.vocab_size, cfg, args)
    clip_path = os.path.join(pre_dir, clip_name)
    if not os.path.isfile(clip_path):
        prepare_clip(clip_path, tok, paths, args)
    print(f"[demo] tiny CLIP ({'random' if args.pretrain_steps == 0 else 'pre-trained on single frames'}, "
          f"frozen from here on): {clip_path}", flush=True)
    if args.prepare_only:
        print(f"DATA_PATH={paths['root']} PRETRAINED_DIR={pre_dir} CLIP_NAME={clip_name} DGL_BPE_PATH={bpe}",
              flush=True)
        return 0

    # 4. train + evaluate DGL with main.py: the default run; --compare: without order negatives, and the
    #    other latent space (without them)
    eval_csv = paths["val_csv"] if args.eval_on == "test" else paths["heldout_csv"]
    eval_table = paths["test_table"] if args.eval_on == "test" else paths["val_table"]
    planned = [("run", args.shared_latent_space, args.order_negatives)]
    if args.compare:
        if args.order_negatives != "none":
            planned.append(("run_plain", args.shared_latent_space, "none"))
        other = "linear" if args.shared_latent_space == "transformer" else "transformer"
        planned.append(("run_linear" if other == "linear" else "run_transformer", other, "none"))
    runs = []
    for name, latent, order in planned:
        folder = run_folder(out, cfg, latent, args.eval_on,
                            name if args.run_name is None else f"{args.run_name}_{name}")
        cmd = main_py_command(args, latent, paths, eval_table, pre_dir, clip_name, bpe, folder, order)
        rc = train_dgl(cmd, folder, run_record(cmd, paths, clip_path), args.retrain)
        if rc:
            return rc
        label = f"DGL-{latent.capitalize()}" + (" + order negatives" if order != "none" else "")
        runs.append((label, folder))
    run_dir = runs[0][1]

    # 5. QB-norm on the default run
    qb = [sys.executable, os.path.join(REPO, "search_for_best_r1_with_qb_norm.py"), "--dataset", "custom",
          "--sim_matrix", os.path.join(run_dir, "custom_sim_matrix.npy"),
          "--train_test_t2v", os.path.join(run_dir, "custom_train_test_t2v.npy"),
          "--train_test_v2t", os.path.join(run_dir, "custom_train_test_v2t.npy"),
          "--t2v_theta", "2", "--v2t_theta", "2", "--beta_step", "0.05"]
    print("[demo] " + " ".join(qb[1:]), flush=True)
    q = subprocess.run(qb, cwd=REPO, capture_output=True, text=True, check=False)
    qb_line = (q.stdout.strip().splitlines() or ["(no output)"])[-1]
    if q.returncode != 0:
        print(q.stdout + q.stderr, file=sys.stderr)
        return q.returncode

    # 6. the comparison table, from the final checkpoints (the epochs were chosen on validation clips)
    from demo.compare import format_table, read_split, trained_dgl, zero_shot
    from modules.clip import build_clip, load_clip_state_dict
    from retrieval.model_io import load_model

    split = read_split(eval_csv, paths["probe_csv"], paths["features_path"], args.eval_on)
    rows = [("zero-shot: frozen CLIP, frames mean-pooled",
             zero_shot(build_clip(load_clip_state_dict(clip_path)), tok, split, args.max_frames, MAX_WORDS))]
    for label, folder in sorted(runs, key=lambda r: ("Linear" in r[0], "order" in r[0])):
        loaded = load_model(clip_path, os.path.join(folder, "ckpt.pth.tar"), bpe_path=bpe)
        rows.append((f"{label}, {args.epochs} epochs", trained_dgl(loaded.model, tok, split)))
    table = format_table(rows, len(split.video_ids), args.eval_on)
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    before = results["evaluations"][0]
    idx = os.path.join(out, "index")
    lines = [
        "",
        "=" * 78,
        (f"DGL demo finished in {time.time() - t0:.0f}s ({_cpu_seconds() - c0:.0f}s of CPU time with main.py; "
         f"{torch.get_num_threads()} threads)"),
        (f"{args.eval_on} set: {len(split.video_ids)} videos, one caption each. Order probe: the share of videos "
        "whose caption"),
        "scores above the same caption with its two moves swapped (\"left then up\" vs \"up then left\").",
        "",
        table,
        "",
        (f"DGL-{args.shared_latent_space} before prompt training: t2v R@1 {before['t2v']['R1']:.1f}%; "
        f"QB-norm on it after training: {qb_line}"),
        f"checkpoint:   {os.path.join(run_dir, 'ckpt.pth.tar')}   (results.json, log.txt, tensorboard/ beside it)",
        f"tiny CLIP:    {clip_path}",
        "search the demo's videos with it:",
        (f"  python search_videos.py index {paths['features_path']} --index {idx} --clip {clip_path} "
        f"--checkpoint {os.path.join(run_dir, 'ckpt.pth.tar')}"),
        f"  python search_videos.py query \"a purple square moves up then right\" --index {idx} -k 5",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
