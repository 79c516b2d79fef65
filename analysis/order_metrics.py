"""The order metrics of a saved run, computed again from its checkpoint and its test set.

    python -m analysis.order_metrics RUN_DIR [--checkpoint FILE] [--val_csv FILE] [--json out.json]

RUN_DIR is a main.py output folder: its ``config.json`` gives the model flags, the CLIP weights, the
vocabulary and the test set; the weights are ``ckpt.best.pth.tar`` (or ``ckpt.pth.tar``, or
``--checkpoint``). ``--val_csv`` scores another test file of the same dataset type instead (e.g. a custom
table with an ``order_twin`` column). Prints, and with ``--json`` writes:

* reversed video: the share of test captions whose video scores above the same video with its frames
  reversed (no labels beyond the test pairs);
* swapped caption (test rows with an ``order_twin``): the share of captions that score above their
  order-swapped twin against their own video.

Ties (equal to float rounding) count one half: a model whose video features do not change under
reversal (mean-pooled frames, DGL-Linear) is at exactly 50 %. Computed in fp32 with PyTorch's own kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

from modules.order import format_order, frame_orders, order_metrics, reorder_frames


def build_parser() -> argparse.ArgumentParser:
    from runtime.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m analysis.order_metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a main.py --output_dir (config.json and a checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="the weights (default: RUN_DIR/ckpt.best.pth.tar, else RUN_DIR/ckpt.pth.tar)")
    p.add_argument("--val_csv", default=None, help="another test annotation file of the run's dataset type")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def _run_config(run_dir: str) -> argparse.Namespace:
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return argparse.Namespace(**json.load(f))
    except FileNotFoundError:
        raise ValueError(f"{path} not found: is {run_dir} a main.py output folder?") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _checkpoint(run_dir: str, given: str | None) -> str:
    candidates = [given] if given else [os.path.join(run_dir, n) for n in ("ckpt.best.pth.tar", "ckpt.pth.tar")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise ValueError(f"no checkpoint: {candidates[0]} not found")


@torch.no_grad()
def compute(run_dir: str, checkpoint: str | None = None, val_csv: str | None = None, batch_size: int = 32) -> dict:
    """{"reversed_video": {...}, "swapped_caption": {...} (with twins), "checkpoint", "num_captions"}."""
    from dataloaders import build_test_dataset
    from modules.dgl import DGL, DGLConfig
    from modules.tokenizer import get_tokenizer

    args = _run_config(run_dir)
    ckpt_path = _checkpoint(run_dir, checkpoint)
    if val_csv:
        args.val_csv = val_csv
    model = DGL.from_pretrained(args.clip_path, **DGLConfig.from_options(args).to_dict())
    model.load_checkpoint(ckpt_path)
    model.eval()
    tokenizer = get_tokenizer(bpe_path=getattr(args, "bpe_path", None), pretrained_dir=getattr(args, "pretrained_dir", None))
    args.image_resolution = model.image_resolution
    args.skip_bad_videos = 0
    test = build_test_dataset(args, tokenizer, "test")
    prompts = model.prompts()

    def videos(reverse: bool) -> torch.Tensor:
        out = []
        for batch in DataLoader(test.video_dataset(), batch_size=batch_size):
            video = batch["video"]
            if reverse:
                video = reorder_frames(video, frame_orders(batch["video_mask"], "reverse"))
            out.append(model.encode_video(video, batch["video_mask"], prompts))
        return torch.cat(out)

    def texts(captions: list[str]) -> torch.Tensor:
        return torch.cat([model.encode_text(torch.stack([test.encode_text(c) for c in captions[s:s + batch_size]]),
                                            prompts) for s in range(0, len(captions), batch_size)])

    text_feats = texts(test.captions)
    twins = list(getattr(test, "order_twins", None) or [])
    twin_feats = None
    if any(twins):
        rows = [i for i, t in enumerate(twins) if t]
        encoded = texts([twins[i] for i in rows])
        twin_feats = torch.full_like(text_feats, float("nan"))
        twin_feats[rows] = encoded
    result = order_metrics(model, text_feats, videos(False), videos(True), test.caption_video_index.long(),
                           twin_feats)
    result.update(checkpoint=ckpt_path, num_captions=int(text_feats.shape[0]))
    return result


def main(argv=None) -> int:
    from runtime.errors import fail, first_line

    args = build_parser().parse_args(argv)
    try:
        result = compute(args.run_dir, args.checkpoint, args.val_csv, args.batch_size)
    except (ValueError, FileNotFoundError, KeyError, OSError, RuntimeError) as e:
        fail(f"{args.run_dir}: {first_line(e)}",
             prog="python -m analysis.order_metrics")
    print(f"{result['checkpoint']}: {result['num_captions']} test captions; order: {format_order(result)}")
    if args.json:
        from runtime.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
