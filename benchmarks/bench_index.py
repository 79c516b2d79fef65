"""Indexing speed of `search_videos.py index`: split between processes, and fed by its decoding workers.

1. **split**: ranges per second of N processes x 1 compute thread (torchrun, gloo) against 1 process x N
   threads, indexing the same collection with the same flags: no loss from splitting the work means a
   ratio near 1 (target >= 0.9). Each run is timed from a barrier after start-up (imports, the model
   loaded) to the commit of the manifest: planning, decoding, encoding, shard writes, the commit.
2. **feed**: ranges per second of one process indexing with ``--workers`` decoding processes ahead of the
   model, against the model alone on the same batches decoded beforehand (the model-only rate): a ratio
   near 1 means the model never waits for frames (target >= 0.9); the decoding rate alone is shown too.

The collection: ``--videos`` clips of preprocess/make_custom_example.py (4 s, 32 x 32 px at 3 fps; one range
each). The model: the tiny CLIP (``--shape tiny``: 2+2 layers, 32 px) or a ViT-B/32-shaped one with random
weights (``--shape vit-b32``: 224 px, ``--layers`` vision and text layers), with random prompts (4 text, 2
per frame, 2 global; prompts in every layer), in a checkpoint of ours. Runs alternate between the settings and the best of ``--repeats`` is kept.

    python benchmarks/bench_index.py                                   # tiny model, 96 clips
    python benchmarks/bench_index.py --shape vit-b32 --layers 4 --videos 24 --frames 12 --batch_size 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_model_files(out: str, vocabulary: str, shape: str, layers: int, frames: int) -> tuple[str, str, str]:
    """(CLIP file, DGL checkpoint, BPE file) of a random model of ``shape``."""
    import torch

    from modules.checkpoints import FORMAT, with_module_prefix
    from modules.clip import CLIP, CLIPConfig, tiny_clip_config
    from modules.dgl import DGL
    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    with open(vocabulary, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    bpe = write_bpe_vocab(texts, os.path.join(out, "bpe.txt.gz"), num_merges=60)
    vocab = get_tokenizer(bpe_path=bpe).vocab_size
    torch.manual_seed(0)
    config = (tiny_clip_config(vocab_size=vocab) if shape == "tiny" else
              CLIPConfig(vocab_size=vocab, vision_layers=layers, transformer_layers=layers))
    clip_path = os.path.join(out, f"clip-{shape}.pt")
    torch.save(CLIP(config).state_dict(), clip_path)
    depth = config.vision_layers
    flags = dict(shared_latent_space="linear", max_frames=frames, unified_transformer_layers=min(depth, 12),
                 text_prompt_length=4, local_each_frame_prompt_length=2, global_visual_prompt_length=2)
    model = DGL.from_pretrained(clip_path, **flags)
    ckpt = os.path.join(out, f"ckpt-{shape}.pth.tar")
    torch.save({"epoch": 1, "state_dict": with_module_prefix(model.state_dict()), "format": FORMAT,
                "config": {**flags, "bpe_path": bpe}}, ckpt)
    return clip_path, ckpt, bpe


# ------------------------------------------------------------------------------------------ one timed run
def worker(args) -> None:
    """One process of a timed run (started alone or by torchrun); process 0 writes the result."""
    import torch

    from modules.backends import set_threads
    from retrieval.encode import encode_batch, video_loader
    from retrieval.index import VideoIndex
    from retrieval.model_io import load_model
    from retrieval.segments import Segmentation
    from runtime.group import exit_now, join

    group = join(cuda=False)
    set_threads(args.threads)
    loaded = load_model(args.clip, args.checkpoint, args.bpe)
    result = {}
    if args.mode == "feed":  # the model alone on batches decoded beforehand, then decoding alone
        model = loaded.model
        from retrieval.encode import find_videos

        items = find_videos([args.collection])
        batches = list(video_loader(items, model.config.max_frames, model.image_resolution, args.batch_size, 0))
        encode_batch(model, batches[0]["video"], batches[0]["mask"], None)  # warm-up
        t0 = time.perf_counter()
        for batch in batches:
            encode_batch(model, batch["video"], batch["mask"], None)
        result["model_only"] = len(items) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in video_loader(items, model.config.max_frames, model.image_resolution, args.batch_size, args.workers):
            pass
        result["decode_only"] = len(items) / (time.perf_counter() - t0)
    group.gather(None)  # every process has started
    t0 = time.perf_counter()
    index = VideoIndex.build(loaded.model, [args.collection], index_dir=args.index, tokenizer=loaded.tokenizer,
                             batch_size=args.batch_size, workers=args.workers, precision="fp32",
                             shard_size=args.shard_size, log=None, segmentation=Segmentation(mode="whole"),
                             group=group)
    group.gather(None)
    seconds = time.perf_counter() - t0
    if group.is_main:
        result.update(ranges=len(index), seconds=seconds, ranges_per_s=len(index) / seconds)
        with open(args.result, "w") as f:
            json.dump(result, f)
    if group.distributed:
        exit_now(0)


def timed_run(common: list[str], index: str, processes: int, threads: int, workers: int, mode: str,
              result: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    script = [os.path.abspath(__file__), "--worker", "--index", index, "--threads", str(threads),
              "--workers", str(workers), "--mode", mode, "--result", result, *common]
    launch = ([sys.executable] if processes == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)])
    done = subprocess.run(launch + script, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_index.py: a timed run failed:\n{done.stderr[-3000:]}")
    with open(result) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "vit-b32"], default="tiny")
    p.add_argument("--layers", type=int, default=12, help="vit-b32: vision and text layers")
    p.add_argument("--frames", type=int, default=4, help="frames per range (max_frames)")
    p.add_argument("--videos", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--shard_size", type=int, default=64)
    p.add_argument("--processes", type=int, default=2, help="split: N processes x 1 thread against 1 x N")
    p.add_argument("--feed_workers", type=int, default=1, help="feed: decoding workers of the process")
    p.add_argument("--feed_threads", type=int, default=1, help="feed: compute threads of the process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", default="split,feed", help="the measurements to make: split, feed or both")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("index", "result", "collection", "clip", "checkpoint", "bpe", "mode"):
        p.add_argument("--" + name, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from preprocess.make_custom_example import make_custom_example

    with tempfile.TemporaryDirectory() as tmp:
        collection = os.path.join(tmp, "collection")
        made = make_custom_example(collection, num_short=args.videos, num_long=0)
        clip, ckpt, bpe = make_model_files(tmp, made["vocabulary"], args.shape, args.layers, args.frames)
        common = ["--collection", os.path.join(collection, "videos"), "--clip", clip, "--checkpoint", ckpt,
                  "--bpe", bpe, "--batch_size", str(args.batch_size), "--shard_size", str(args.shard_size)]
        n = args.processes
        runs = {"split": [], "together": [], "feed": []}
        parts = set(args.parts.split(","))
        for r in range(args.repeats):
            order = [("split", n, 1), ("together", 1, n)] if r % 2 == 0 else [("together", 1, n), ("split", n, 1)]
            for name, processes, threads in order if "split" in parts else ():
                runs[name].append(timed_run(common, os.path.join(tmp, f"{name}{r}"), processes, threads, 0, "split",
                                            os.path.join(tmp, f"{name}{r}.json")))
            if "feed" in parts:
                runs["feed"].append(timed_run(common, os.path.join(tmp, f"feed{r}"), 1, args.feed_threads,
                                              args.feed_workers, "feed", os.path.join(tmp, f"feed{r}.json")))
    best = {k: max(v, key=lambda x: x["ranges_per_s"]) for k, v in runs.items() if v}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"model {args.shape}{'' if args.shape == 'tiny' else f' ({args.layers} layers)'}, {args.frames} frames, "
          f"{args.videos} ranges, batch {args.batch_size}; best of {args.repeats}; "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    if "split" in best:
        print(f"split: {n} processes x 1 thread {best['split']['ranges_per_s']:.2f} ranges/s, 1 process x {n} "
              f"threads {best['together']['ranges_per_s']:.2f} ranges/s: ratio "
              f"{best['split']['ranges_per_s'] / best['together']['ranges_per_s']:.2f}")
    if "feed" not in best:
        return
    feed = best["feed"]
    model_only = max(x["model_only"] for x in runs["feed"])
    decode_only = max(x["decode_only"] for x in runs["feed"])
    print(f"feed: 1 process x {args.feed_threads} thread(s) with {args.feed_workers} decoding worker(s) "
          f"{feed['ranges_per_s']:.2f} ranges/s; the model alone {model_only:.2f} ranges/s: ratio "
          f"{feed['ranges_per_s'] / model_only:.2f}; decoding alone ({args.feed_workers} worker(s)) "
          f"{decode_only:.2f} ranges/s")


if __name__ == "__main__":
    main()
