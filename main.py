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


def exit_status(exc: BaseException) -> int:
    """The status Python would exit with on ``exc``, saying on stderr what it would say."""
    if isinstance(exc, SystemExit):  # a one-line error (status 2) or another stop
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    import traceback

    traceback.print_exc()
    return 1


def main(argv=None) -> int:
    from training.config import parse_args

    # --help and bad flags stop here, with one line, before torch is imported: the flags and their checks
    # (training.config, runtime.model_flags, modules.dgl_config) import it only where a check needs it
    # (--device cuda, annotation tables) or the flags passed
    args = parse_args(argv)
    from training import distributed
    from training.runner import run

    try:
        run(args)
    except BaseException as exc:
        if distributed.is_initialized():  # see distributed.exit_member: the error's status, not SIGABRT
            distributed.exit_member(exit_status(exc))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
