"""main.py end to end on generated MSR-VTT-like videos, with and without a frame cache: seconds per
training step against the step's own compute (the model-only step).

    python benchmarks/bench_loader_e2e.py [--num_train 48] [--batch_size 8] [--vision_layers 2]
                                          [--workers 1] [--device cpu] [--precision fp32]

Renders ``--num_train`` + 8 clips of 10 s at 3 fps, 398x224 (moving shapes over a scrolling texture, as
``benchmarks/bench_data.py``), writes MSR-VTT annotation files for them, saves a random CLIP of the
ViT-B/32 shape (224 px, patch 32, width 768) with ``--vision_layers`` layers, builds a raw frame cache
(``python -m preprocess.frame_cache``), then trains one epoch with ``main.py`` twice: decoding the videos,
and reading the cache (``--frame_cache``). main.py logs every step's data wait and step time; the model-only
step is the step time less the data wait. Steps after the first of each run are reported (median).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_data import render  # noqa: E402
from preprocess.ffmpeg_tools import write_video  # noqa: E402
from preprocess.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402

STEP = re.compile(r"step (\d+) loss \S+ .* data ([0-9.]+)s step ([0-9.]+)s")


def prepare(root: str, a) -> tuple[dict, str, str]:
    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    paths = make_synthetic_dataset(os.path.join(root, "data"), num_train=a.num_train, num_test=8, seed=0, size=32,
                                   min_frames=30, max_frames=30, workers=1)
    for name in sorted(os.listdir(paths["features_path"])):  # MSR-VTT-like content: 10 s, 3 fps, 398x224
        index = int(re.sub(r"\D", "", name))
        write_video(os.path.join(paths["features_path"], name), render(index, 10.0), fps=3.0, crf=23)
    captions = [s["caption"] for s in json.load(open(paths["data_path"]))["sentences"]]
    pre = os.path.join(root, "pre")
    bpe = write_bpe_vocab(captions, os.path.join(pre, "bpe.txt.gz"), num_merges=100)
    torch.manual_seed(0)
    config = tiny_clip_config(vocab_size=get_tokenizer(bpe_path=bpe).vocab_size, image_resolution=224,
                              vision_patch_size=32, vision_width=768, vision_layers=a.vision_layers, embed_dim=512)
    torch.save(CLIP(config).state_dict(), os.path.join(pre, "clip.pt"))
    return paths, pre, bpe


def run_main(paths, pre, bpe, out, a, extra) -> list[tuple[float, float]]:
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--datatype", "msrvtt", "--train_csv", paths["train_csv"],
           "--val_csv", paths["val_csv"], "--data_path", paths["data_path"], "--features_path",
           paths["features_path"], "--pretrained_dir", pre, "--pretrained_clip_name", "clip.pt", "--bpe_path", bpe,
           "--max_words", "32", "--max_frames", "12", "--do_train", "1", "--do_eval", "0", "--epochs", "1",
           "--batch_size", str(a.batch_size), "--n_display", "1", "--num_thread_reader", str(a.workers),
           "--device", a.device, "--precision", a.precision, "--no_progress", "--seed", "0", "--output_dir", out,
           "--unified_transformer_layers", str(a.vision_layers), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"main.py failed: {r.stderr[-2000:]}")
    with open(os.path.join(out, "log.txt")) as f:
        steps = [(float(m.group(2)), float(m.group(3))) for m in map(STEP.search, f) if m]
    return steps[1:]  # the first step includes the workers' start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num_train", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--vision_layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="main.py --num_thread_reader")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.time()
        paths, pre, bpe = prepare(root, a)
        cache = os.path.join(root, "cache")
        subprocess.run([sys.executable, "-m", "preprocess.frame_cache", "--out", cache, "--videos",
                        paths["features_path"]], cwd=REPO, check=True, capture_output=True)
        print(f"{a.num_train} training clips of 10 s at 3 fps, 398x224; CLIP ViT-B/32 shape with {a.vision_layers} "
              f"vision layers; batch {a.batch_size}, 12 frames, {a.precision} on {a.device}, {a.workers} loader "
              f"worker(s), {os.cpu_count()} CPUs (prepared in {time.time() - t0:.0f} s)")
        print(f"  {'input':>12s} {'s/step':>7s} {'data wait':>9s} {'model-only':>10s} {'step/model-only':>15s}")
        for label, extra in (("decoding", []), ("frame cache", ["--frame_cache", cache])):
            steps = run_main(paths, pre, bpe, os.path.join(root, label.replace(" ", "_")), a, extra)
            step = statistics.median(s for _, s in steps)
            wait = statistics.median(d for d, _ in steps)
            model = statistics.median(s - d for d, s in steps)
            print(f"  {label:>12s} {step:7.3f} {wait:9.3f} {model:10.3f} {step / model:14.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
