"""A tiny random CLIP and a small BPE vocabulary, for worked examples and smoke runs without CLIP's weights.

    python -m preprocess.make_tiny_clip --texts vocabulary.txt --out DIR [--seed 0]

writes ``DIR/tiny-clip.pt`` (a state dict in OpenAI's layout: main.py's ``--pretrained_dir DIR
--pretrained_clip_name tiny-clip.pt``, search_videos.py's ``--clip``) and ``DIR/bpe.txt.gz`` (a BPE
vocabulary learnt from the lines of ``--texts``: ``--bpe_path``). The weights are random: what a run
learns on top of them is only what the prompts learn.
"""
from __future__ import annotations

import argparse
import os
import sys

CLIP_NAME = "tiny-clip.pt"
BPE_NAME = "bpe.txt.gz"


def write_tiny_clip(texts: list[str], out_dir: str, seed: int = 0, num_merges: int = 300) -> dict:
    import torch

    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    os.makedirs(out_dir, exist_ok=True)
    bpe = write_bpe_vocab(texts, os.path.join(out_dir, BPE_NAME), num_merges=num_merges)
    vocab = get_tokenizer(bpe_path=bpe).vocab_size
    torch.manual_seed(seed)
    clip = CLIP(tiny_clip_config(vocab_size=vocab, image_resolution=32, vision_patch_size=8))
    path = os.path.join(out_dir, CLIP_NAME)
    tmp = path + ".tmp"
    torch.save(clip.state_dict(), tmp)
    os.replace(tmp, path)
    return {"clip": path, "bpe": bpe, "vocab_size": vocab}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tiny_clip", description="Write a tiny random CLIP and a small BPE vocabulary.")
    p.add_argument("--texts", required=True, help="a UTF-8 text file: the vocabulary is learnt from its lines")
    p.add_argument("--out", required=True, help="folder for tiny-clip.pt and bpe.txt.gz")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"tiny_clip: error: cannot read --texts {args.texts}: {exc}\n")
        return 2
    if not texts:
        sys.stderr.write(f"tiny_clip: error: --texts {args.texts} has no lines\n")
        return 2
    info = write_tiny_clip(texts, args.out, args.seed)
    print(f"tiny CLIP: {info['clip']}; BPE vocabulary ({info['vocab_size']} tokens): {info['bpe']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
