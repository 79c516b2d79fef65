"""The output folder of a run (checked before anything is written, so that a run never writes over
another run (or an evaluation over a training run), and a path that cannot be written is reported in
one line), and what is written into it besides checkpoints: TensorBoard scalars and results.json."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil

from analysis.query_ranks import evaluation_extras
from runtime.errors import fail
from runtime.files import atomic_write_text, remove_stale_temporary_files
from runtime.logs import LOGGER_NAME

CKPT = "ckpt.pth.tar"
CKPT_BEST = "ckpt.best.pth.tar"
CHECKPOINTS = (CKPT, CKPT_BEST)
# what a run writes (see the README, "What a run writes"); tensorboard/ and *.npy matrices too
RUN_FILES = CHECKPOINTS + ("results.json", "config.json", "log.txt", "reproducibility.json")
# written per evaluation (ranks) and with --save_sim_matrix (similarity matrices and QB-norm banks)
RUN_FILE_PATTERNS = ("ranks_*.json", "*_sim_matrix.npy", "*_caption_video_index.npy", "*_train_test_*.npy",
                     "*_train_train_*.npy")
# a folder holds a run once it holds results: a checkpoint or results.json (a start that failed before its
# first evaluation leaves only a log, which the next start appends to)
RESULT_FILES = CHECKPOINTS + ("results.json",)


def files_of_a_run(out_dir: str) -> list[str]:
    """The names of the run files already in ``out_dir`` (empty when it holds no run)."""
    if not os.path.isdir(out_dir):
        return []
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if os.path.isdir(os.path.join(out_dir, "tensorboard")):
        found.append("tensorboard/")
    for pattern in RUN_FILE_PATTERNS:
        found += sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, pattern)))
    return found


def _continues_the_run_in(args, out_dir: str) -> bool:
    """--resume of a checkpoint inside out_dir, to go on training it."""
    if not (args.do_train and args.resume) or args.load_from_pretrained:
        return False
    return os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) == os.path.realpath(out_dir)


def check_output_dir(args) -> None:
    """Stop with one line, before anything is written, when --output_dir cannot be used by this run."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--output_dir {out} is a file, not a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--output_dir {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--output_dir {out} is not writable (permission denied on {existing})")
    held = files_of_a_run(out)
    if not any(name in held for name in RESULT_FILES) or _continues_the_run_in(args, out):
        return
    listing = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
    if not args.do_train:
        if any(name in held for name in CHECKPOINTS):
            fail(f"--output_dir {out} holds a training run ({listing}); an evaluation writes to a folder of its "
                 "own: pass another --output_dir")
        if not args.overwrite_output_dir:
            fail(f"--output_dir {out} already holds an evaluation ({listing}); pass another --output_dir, or "
                 "--overwrite_output_dir to replace it")
        return
    if not args.overwrite_output_dir:
        resume = f"continue it with --resume {os.path.join(out, CKPT)}, " if CKPT in held else ""
        fail(f"--output_dir {out} already holds a run ({listing}); {resume}start it over with --overwrite_output_dir, "
             "or pass another --output_dir")


LOCK_FILE = ".main.lock"
_held: dict[str, int] = {}  # output folder -> descriptor of its lock file, while this process runs in it


def lock_output_dir(out: str) -> None:
    """Hold an exclusive lock on ``out`` until :func:`unlock_output_dir` (or until the process ends, whatever
    ends it): a second main.py started with the same folder while this one runs is refused in one line
    instead of both writing their files into it."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        fail(f"--output_dir {out}: cannot create {LOCK_FILE} ({os.strerror(exc.errno).lower() if exc.errno else exc})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        fail(f"--output_dir {out} is in use by another main.py run; wait for it to end, or pass another "
             "--output_dir")
    _held[os.path.realpath(out)] = fd  # the file stays empty: a refused or failed run changes nothing in the folder


def unlock_output_dir(out: str) -> None:
    fd = _held.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)  # the file stays: removing it would let a waiting run lock a file no longer in the folder


def prepare_output_dir(args, is_main: bool) -> list[str]:
    """Create --output_dir (main process); with --overwrite_output_dir remove the earlier run's files; remove
    temporary files a killed write left. Returns what was done, for the log (logging starts after this)."""
    out = args.output_dir
    notes: list[str] = []
    if not is_main:
        return notes
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        fail(f"--output_dir {out} cannot be created ({os.strerror(exc.errno).lower() if exc.errno else exc})")
    lock_output_dir(out)
    try:
        check_output_dir(args)  # again, under the lock: a run that ended meanwhile may have left its files here
    except SystemExit:
        unlock_output_dir(out)
        raise
    held = files_of_a_run(out)
    starting_over = args.overwrite_output_dir and not _continues_the_run_in(args, out)
    if starting_over and any(name in held for name in RESULT_FILES):
        for name in held:
            path = os.path.join(out, name.rstrip("/"))
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            except OSError as exc:
                fail(f"--overwrite_output_dir: cannot remove {path} ({os.strerror(exc.errno).lower()})")
        notes.append(f"--overwrite_output_dir: removed the earlier run's {', '.join(held)}")
    stale = remove_stale_temporary_files(out)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
    return notes


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
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")


def evaluation_entry(res: dict, tag: str, epoch: int, global_step: int, train_stats: dict | None,
                     test_left_out_at_start: dict) -> dict:
    """One evaluation as results.json lists it (``res``: training.evaluation.evaluate's result)."""
    entry = {"tag": tag, "epoch": epoch, "global_step": global_step, "t2v": res["t2v"], "v2t": res["v2t"],
             "num_captions": res["num_captions"], "num_videos": res["num_videos"],
             "multi_sentence": bool(res.get("multi_sentence")), "eval_time": round(res["time"], 3)}
    left_out = _test_videos_left_out(res, test_left_out_at_start)
    if left_out:
        entry["test_left_out"] = left_out
    if train_stats:
        entry.update(train_loss=train_stats["loss"], train_time=round(train_stats["time"], 3),
                     train_replaced=train_stats["replaced"])
    if res.get("frame_cache"):  # clips served by --frame_cache and read from their files
        entry["frame_cache"] = res["frame_cache"]
    if train_stats and train_stats.get("frame_cache"):
        entry["train_frame_cache"] = train_stats["frame_cache"]
    if res.get("order"):
        entry["order"] = res["order"]
    entry.update(evaluation_extras(res))
    return entry


def _test_videos_left_out(res: dict, at_start: dict) -> dict | None:
    """Test videos and captions an evaluation lacks: missing at start-up plus undecodable now."""
    videos = at_start.get("videos", 0) + len(res.get("unreadable_videos") or [])
    if not videos:
        return None
    return {"videos": videos, "captions": at_start.get("captions", 0) + res.get("captions_left_out", 0),
            "comparable_to_full_test_set": False}
