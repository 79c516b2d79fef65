"""Atomic file writes: a result file is the old one or the new one, never a part.

Each writer goes through a temporary file next to the target (``.<name>.<random>.tmp``), flushed and
fsynced, then ``os.replace``d over the target. A failure removes the temporary file and raises
:class:`OutputWriteError` with a one-line reason.
"""
from __future__ import annotations

import errno
import os
import tempfile
import threading

import numpy as np
import torch


class OutputWriteError(OSError):
    """A result file could not be written; the message names the file and the reason, in one line."""


TMP_SUFFIX = ".tmp"


def _write_failure_reason(exc: BaseException, directory: str) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    # torch's zip writer reports a failed write as "unexpected pos ..." / "file write failed"
    try:
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "no space left on device"
    except OSError:
        pass
    text = str(exc).strip().splitlines()
    return f"write failed ({type(exc).__name__}: {text[0] if text else ''})"


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Read from /proc where it can be (reading it through os.umask sets it for a
    moment, and two threads doing so at once can leave it at 0); else under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


def give_new_file_mode(path: str) -> None:
    """Temporary files from mkstemp are 0600; give ``path`` the mode a new file gets under the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Write to a temporary file next to ``path``, then rename it: ``path`` is the old file or the new one,
    never a part. A failure removes the temporary file and raises :class:`OutputWriteError`."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=d)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        give_new_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(f"{_write_failure_reason(exc, d)} while writing {path}") from exc
        raise


def remove_stale_temporary_files(directory: str) -> list[str]:
    """Delete the temporary files (``.<name>.<random>.tmp``) a killed write left in ``directory``."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(".") and name.endswith(TMP_SUFFIX) and name.count(".") >= 3:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    os.unlink(path)
                    removed.append(name)
                except OSError:
                    pass
    return removed


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_np_save(path: str, array) -> None:
    atomic_write(path, lambda f: np.save(f, np.asarray(array)))
