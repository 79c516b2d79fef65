"""torchrun for the dataset scripts, without torchrun's failure report.

``python -m training.launch [torchrun options] main.py [flags]`` runs exactly what torchrun runs. When a
process fails, torchrun would print a ~30-line ``ChildFailedError`` report after the process's own
one-line error and exit with status 1; here the process's error stays the last line and its exit status
(2 for bad input) is the launcher's.
"""
from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the failed process has said why; no "closing signal" / "failed (exitcode ...)" lines after it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        _rank, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
