"""Locks of an index folder (``fcntl.flock``, released by the kernel when the holder exits or is killed).

* ``.index.lock``: held exclusively by an ``index`` run for the whole run, so two runs into one folder
  take turns (the second waits, saying so) and both runs' entries end in the index.
* ``.commit.lock``: readers (query, serve, evaluate) hold it shared while they read the index; an
  ``index`` run holds it exclusively only while it commits (rewrites shards it dropped entries from,
  writes ``index.json``). So a reader sees the index as one run left it, never half of a commit, and
  readers do not wait for a whole ``index`` run, only for its commit.

A folder whose filesystem cannot lock (some network filesystems) is used without locks, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

WRITER_LOCK = ".index.lock"
COMMIT_LOCK = ".commit.lock"

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextlib.contextmanager
def writer_lock(index_dir: str, log=None):
    """Hold ``index_dir``'s writer lock for the block; wait (saying so through ``log``) while another
    process holds it. The folder must exist."""
    fd = os.open(os.path.join(index_dir, WRITER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting: another index run{_holder(fd)} is writing to {index_dir}; this run continues "
                    "when it ends (Ctrl-C to give up)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            if log:
                log(f"warning: {index_dir} cannot be locked ({os.strerror(err.errno)}); do not run two "
                    "index runs into it at once")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def commit_lock(index_dir: str, shared: bool):
    """``shared``: a reader's hold on ``index_dir`` (none when the folder has no lock file, e.g. an index
    made before locks or a folder the reader may not write); else a writer's commit (creates the file)."""
    path = os.path.join(index_dir, COMMIT_LOCK)
    try:
        if shared:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def reading(index_dir: str):
    """The block reads ``index_dir``: no ``index`` run commits meanwhile."""
    return commit_lock(index_dir, shared=True)
