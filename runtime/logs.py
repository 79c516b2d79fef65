"""Logging setup for the programs: console (through tqdm, so progress bars stay whole) + <output_dir>/log.txt
on the main process; progress bars only on a terminal."""
from __future__ import annotations

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
            from runtime.errors import fail
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


