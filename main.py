#!/usr/bin/env python
"""DGL text-video retrieval: training and evaluation.

    python main.py --do_train 1 --datatype msrvtt --train_csv ... --val_csv ... --data_path ... \
        --features_path ... --pretrained_dir <dir with ViT-B-32.pt> --output_dir runs/msrvtt
    torchrun --nproc_per_node 4 main.py ...             # DDP, NCCL on GPUs / gloo on CPU
    python main.py --do_eval 1 --resume ckpt.best.pth.tar ...   # evaluate a (published) checkpoint

See ``python main.py --help`` and scripts/*.sh.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from training.config import parse_args

    args = parse_args(argv)  # bad flags stop here with one line, before torch is imported
    from training import distributed
    from training.runner import run

    try:
        run(args)
    except SystemExit as exc:  # a one-line error (status 2) or another stop
        if distributed.is_initialized():
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
            distributed.exit_member(exc.code if isinstance(exc.code, int) else int(exc.code is not None))
        raise
    except BaseException:
        if distributed.is_initialized():
            import traceback

            traceback.print_exc()
            distributed.exit_member(1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
