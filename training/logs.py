"""Logging for runs: console + <output_dir>/log.txt (main process), TensorBoard scalars, results.json."""
from __future__ import annotations

import json
import logging
import os
import sys

LOGGER_NAME = "dgl"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that does not break tqdm bars."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
            self.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def setup_logging(output_dir: str | None, is_main: bool, rank: int = 0, debug: bool = False) -> logging.Logger:
    """Configure the 'dgl' logger (and the 'dataloaders' / 'modules' loggers) for this process."""
    level = logging.DEBUG if debug else logging.INFO
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s" if not is_main
                            else "%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    console.setLevel(level if is_main else logging.WARNING)
    handlers = [console]
    if is_main and output_dir:
        path = os.path.join(output_dir, "log.txt")
        try:
            os.makedirs(output_dir, exist_ok=True)
            fh = logging.FileHandler(path, mode="a")
        except OSError as exc:
            from training.config import fail
            fail(f"cannot write {path} ({os.strerror(exc.errno).lower() if exc.errno else exc})")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(level)
        handlers.append(fh)
    logger.setLevel(level)
    for h in handlers:
        logger.addHandler(h)
    # the data and model packages log under their own names: route them to the same place
    for name in ("dataloaders", "modules", "preprocess"):
        other = logging.getLogger(name)
        other.propagate = False
        for h in list(other.handlers):
            other.removeHandler(h)
        other.setLevel(level)
        for h in handlers:
            other.addHandler(h)
    return logger


def close_logging() -> None:
    """Undo setup_logging: close the handlers and give the loggers back to the root logger."""
    for name in (LOGGER_NAME, "dataloaders", "modules", "preprocess"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)


def progress_bars_wanted(no_progress: bool = False) -> bool:
    """Progress bars only for a person watching: not with --no_progress, not when stderr goes to a file or pipe."""
    if no_progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def log_to_file_only(level: int, message: str) -> None:
    """Write ``message`` to log.txt but not to the console (where it is printed another way)."""
    logger = logging.getLogger(LOGGER_NAME)
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)


class Board:
    """TensorBoard writer on the main process only (a no-op elsewhere or when disabled).

    ``purge_step``: a resumed run starts again at this step; TensorBoard discards the events an earlier
    run logged at this step and later, so redone steps are not shown twice.
    """

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        if log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir, purge_step=purge_step)
            except Exception as e:  # noqa: BLE001 - tensorboard missing: keep training
                logging.getLogger(LOGGER_NAME).warning("TensorBoard disabled: %s", e)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(prefix + k, float(v), global_step=step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_results(path: str, results: dict) -> None:
    from training.checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")
