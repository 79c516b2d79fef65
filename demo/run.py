"""The embedded demo (scripts/demo.sh): synthetic data -> small random CLIP -> train DGL on CPU ->
evaluate before and after -> QB-norm search.

    python -m demo [--out demo_output] [--epochs 8] [--num_train 240] [--num_test 60]

Everything it needs is made here: the synthetic MSR-VTT-layout dataset, a small random-initialised
CLIP in the OpenAI state-dict format (real weights cannot be downloaded everywhere) and, when CLIP's
BPE file is not found, a small BPE vocabulary learnt from the dataset's captions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def _default_bpe_candidates(pretrained_dir: str | None) -> list[str]:
    c = []
    if pretrained_dir:
        c.append(os.path.join(pretrained_dir, BPE_NAME))
    if os.environ.get("DGL_BPE_PATH"):
        c.append(os.environ["DGL_BPE_PATH"])
    shared = os.environ.get("DGL_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
    c.append(os.path.join(shared, "data", "clip", BPE_NAME))
    return c


def _captions(data_json: str) -> list[str]:
    with open(data_json, encoding="utf-8") as f:
        return [s["caption"] for s in json.load(f)["sentences"]]


def build_parser() -> argparse.ArgumentParser:
    from runtime.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_output", help="everything goes here (default: demo_output)")
    p.add_argument("--pretrained_dir", default=None, help="use CLIP's BPE file from here when present")
    p.add_argument("--num_train", type=int, default=240)
    p.add_argument("--num_test", type=int, default=60)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max_frames", type=int, default=6)
    p.add_argument("--shared_latent_space", default="transformer", choices=["transformer", "linear"])
    p.add_argument("--own_vocab", action="store_true", help="always learn the small BPE vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, passed on to main.py (default: the cores minus the data-loader workers)")
    p.add_argument("--eval_precision", default=None, choices=["fp32", "bf16"],
                   help="passed on to main.py: bf16 encodes the test videos with bf16 autocast")
    p.add_argument("--prepare_only", action="store_true",
                   help="only write the dataset, the vocabulary and the small CLIP (e.g. to smoke-test "
                        "scripts/msrvtt.sh on CPU), then print the environment to use them")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(args.out)
    data_dir, pre_dir, run_dir = (os.path.join(out, d) for d in ("data", "pretrained", "run"))
    os.makedirs(pre_dir, exist_ok=True)

    import torch

    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from preprocess.make_synthetic_dataset import make_synthetic_dataset

    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. data
    marker = os.path.join(data_dir, ".complete-{}-{}-{}".format(args.num_train, args.num_test, args.seed))
    if not os.path.isfile(marker):
        print(f"[demo] writing the synthetic dataset to {data_dir} ...", flush=True)
        paths = make_synthetic_dataset(data_dir, num_train=args.num_train, num_test=args.num_test, seed=args.seed)
        open(marker, "w").close()
    else:
        paths = {"train_csv": os.path.join(data_dir, "MSRVTT_train.9k.csv"),
                 "val_csv": os.path.join(data_dir, "MSRVTT_JSFUSION_test.csv"),
                 "data_path": os.path.join(data_dir, "MSRVTT_data.json"),
                 "features_path": os.path.join(data_dir, "videos")}
        print(f"[demo] using the synthetic dataset in {data_dir}", flush=True)

    # 2. BPE vocabulary
    bpe = None if args.own_vocab else next((c for c in _default_bpe_candidates(args.pretrained_dir)
                                            if os.path.isfile(c)), None)
    if bpe is None:
        bpe = os.path.join(pre_dir, BPE_NAME)
        if not os.path.isfile(bpe):
            print("[demo] CLIP's BPE file not found: learning a small BPE vocabulary from the captions", flush=True)
            write_bpe_vocab(_captions(paths["data_path"]), bpe, num_merges=300)
        vocab_note = "a small BPE vocabulary learnt from the captions"
    else:
        vocab_note = "CLIP's BPE vocabulary"
    tok = get_tokenizer(bpe_path=bpe)
    print(f"[demo] tokenizer: {bpe} ({tok.vocab_size} tokens, {vocab_note})", flush=True)

    # 3. a small random CLIP in the OpenAI state-dict format
    clip_name = f"tiny-clip-v{tok.vocab_size}.pt"
    clip_path = os.path.join(pre_dir, clip_name)
    if not os.path.isfile(clip_path):
        torch.manual_seed(args.seed)
        cfg = tiny_clip_config(vocab_size=tok.vocab_size, image_resolution=32, vision_patch_size=8,
                               vision_layers=2, transformer_layers=2, vision_width=128, transformer_width=128,
                               transformer_heads=2, embed_dim=64, context_length=77)
        tmp = clip_path + ".tmp"
        torch.save(CLIP(cfg).state_dict(), tmp)
        os.replace(tmp, clip_path)
    print(f"[demo] random-initialised CLIP: {clip_path}", flush=True)
    if args.prepare_only:
        print(f"DATA_PATH={data_dir} PRETRAINED_DIR={pre_dir} CLIP_NAME={clip_name} DGL_BPE_PATH={bpe}", flush=True)
        return 0

    # 4. train + evaluate (before and after) with main.py
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--do_train", "1", "--do_eval", "1",
           "--datatype", "msrvtt", "--train_csv", paths["train_csv"], "--val_csv", paths["val_csv"],
           "--data_path", paths["data_path"], "--features_path", paths["features_path"],
           "--expand_msrvtt_sentences", "--feature_framerate", "3", "--slice_framepos", "2",
           "--max_words", "16", "--max_frames", str(args.max_frames),
           "--pretrained_dir", pre_dir, "--pretrained_clip_name", clip_name, "--bpe_path", bpe,
           "--shared_latent_space", args.shared_latent_space, "--text_prompt_length", "8",
           "--local_each_frame_prompt_length", "4", "--global_visual_prompt_length", "4",
           "--unified_transformer_layers", "2", "--freeze_clip", "1",
           "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--batch_size_val", "32",
           "--lr", str(args.lr), "--wd", "0.2", "--warmup_proportion", "0.1", "--clip_grad_norm", "1.0",
           "--precision", "fp32", "--seed", str(args.seed), "--n_display", "10",
           "--device", "cpu", "--save_sim_matrix", "--output_dir", run_dir,
           "--overwrite_output_dir"]  # a second demo starts its run over
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.eval_precision:
        cmd += ["--eval_precision", args.eval_precision]
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode != 0:
        print(f"[demo] main.py failed with exit status {r.returncode}", file=sys.stderr)
        return r.returncode

    # 5. QB-norm
    qb = [sys.executable, os.path.join(REPO, "search_for_best_r1_with_qb_norm.py"), "--dataset", "msrvtt",
          "--sim_matrix", os.path.join(run_dir, "msrvtt_sim_matrix.npy"),
          "--train_test_t2v", os.path.join(run_dir, "msrvtt_train_test_t2v.npy"),
          "--train_test_v2t", os.path.join(run_dir, "msrvtt_train_test_v2t.npy"),
          "--t2v_theta", "2", "--v2t_theta", "2", "--beta_step", "0.05"]
    print("[demo] " + " ".join(qb[1:]), flush=True)
    q = subprocess.run(qb, cwd=REPO, capture_output=True, text=True)
    qb_line = (q.stdout.strip().splitlines() or ["(no output)"])[-1]
    if q.returncode != 0:
        print(q.stdout + q.stderr, file=sys.stderr)
        return q.returncode

    # 6. summary
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    evals = results["evaluations"]
    before, after = evals[0], evals[-1]
    n = after["num_videos"]
    chance = 100.0 / n
    lines = [
        "",
        "=" * 72,
        f"DGL demo finished in {time.time() - t0:.0f}s (CPU, {torch.get_num_threads()} threads)",
        f"test set: {n} videos, one caption each; chance text-to-video R@1 = {chance:.1f}%",
        f"text-to-video R@1 before training: {before['t2v']['R1']:.1f}%   after {after['epoch']} epochs: "
        f"{after['t2v']['R1']:.1f}% ({after['t2v']['R1'] / chance:.1f}x chance), "
        f"R@5 {after['t2v']['R5']:.1f}%, R@10 {after['t2v']['R10']:.1f}%",
        f"best epoch: {results['best']['epoch']} with text-to-video R@1 {results['best']['t2v']['R1']:.1f}% "
        f"(saved as ckpt.best.pth.tar)" if results.get("best") else "best epoch: n/a",
        f"video-to-text R@1 before: {before['v2t']['R1']:.1f}%   after: {after['v2t']['R1']:.1f}%",
        f"QB-norm: {qb_line}",
        f"checkpoints:  {os.path.join(run_dir, 'ckpt.pth.tar')} , {os.path.join(run_dir, 'ckpt.best.pth.tar')}",
        f"results:      {os.path.join(run_dir, 'results.json')}",
        f"log:          {os.path.join(run_dir, 'log.txt')}",
        f"TensorBoard:  tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
