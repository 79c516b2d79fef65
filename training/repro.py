"""The reproducibility record of a run: ``<output_dir>/reproducibility.json``, written next to config.json.

It holds what decides a run's numbers besides its flags: library versions (torch, CUDA, cuDNN, the video
decoders), the devices and process count, per-process and global batch, precision, seed and determinism
settings, input size and pixel-path choices, and a sha256 of every annotation file the run reads.
Two runs whose records agree in these fields and whose numbers still differ point at the data (videos),
not the setup.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata

import torch

RECORD_NAME = "reproducibility.json"
_HASH_BLOCK = 1 << 20

# flags that decide which frames and pixels reach the model; missing ones are recorded as None
INPUT_FIELDS = ("image_resolution", "max_frames", "max_words", "feature_framerate", "slice_framepos",
                "train_frame_order", "eval_frame_order", "resize_short_side", "video_decoder",
                "mask_padding_frames", "expand_msrvtt_sentences", "skip_bad_videos", "clip_spans_to_video")
PACKAGES = ("torch", "numpy", "decord", "av", "pillow", "faiss-cpu", "faiss-gpu")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _join(folder, name):
    return os.path.join(folder, name) if folder else name


def _msrvtt_files(args, splits):
    files = []
    if "train" in splits:
        files.append(getattr(args, "train_csv", None))
        data = getattr(args, "data_path", None)
        files.append(_join(data, "MSRVTT_data.json") if data and os.path.isdir(data) else data)
    if splits - {"train"}:
        files.append(getattr(args, "val_csv", None))
    return files


def _per_split_files(table):
    def files(args, splits):
        data = getattr(args, "data_path", None)
        out = []
        for split in (s for s in ("train", "val", "test") if s in splits):
            out += [_join(data, name) for name in table(split)]
        return out
    return files


def _msvd_captions(data):
    pkl = _join(data, "raw-captions.pkl")
    return pkl if os.path.isfile(pkl) else _join(data, "raw-captions.json")


def _msvd_files(args, splits):
    return _per_split_files(lambda s: [f"{s}_list.txt"])(args, splits) + [
        _msvd_captions(getattr(args, "data_path", None))]


def _dataset_table_files(datatype, attribute, extra=()):
    """Files named by the dataset class's table (``list_files`` / ``csv_files`` / ``files``) plus ``extra``."""
    def table(split):
        from dataloaders import DATASETS
        names = getattr(DATASETS[datatype], attribute)[split]
        return (list(names) if isinstance(names, (list, tuple)) else [names]) + list(extra)
    return _per_split_files(table)


def _custom_files(args, splits):
    files = [getattr(args, "train_csv", None)] if "train" in splits else []
    if splits - {"train"}:
        files.append(getattr(args, "val_csv", None))
    return files


ANNOTATION_FILES = {
    "msrvtt": _msrvtt_files,
    "vatex": _dataset_table_files("vatex", "list_files", ["ref_captions.json"]),
    "lsmdc": _dataset_table_files("lsmdc", "csv_files"),
    "activity": _dataset_table_files("activity", "files"),
    "msvd": _msvd_files,
    "didemo": _per_split_files(lambda s: [f"{s}_list.txt", f"{s}_data.json"]),
    "custom": _custom_files,
}


def annotation_files(args, splits) -> list[str]:
    """The annotation files ``args.datatype`` reads for ``splits`` (e.g. {"train", "test"}), in order,
    without duplicates. The LSMDC ``video_path.json`` map is included when it exists."""
    datatype = getattr(args, "datatype", None) or "msrvtt"
    if datatype not in ANNOTATION_FILES:
        return []
    files = ANNOTATION_FILES[datatype](args, set(splits))
    if datatype == "lsmdc":
        mapping = _join(getattr(args, "data_path", None), "video_path.json")
        if os.path.isfile(mapping):
            files.append(mapping)
    return list(dict.fromkeys(f for f in files if f))


def hash_annotation_files(paths) -> list[dict]:
    """[{path, bytes, sha256}] per file; a file that cannot be read gets ``sha256: None`` and the reason."""
    out = []
    for path in paths:
        entry = {"path": os.path.abspath(path), "bytes": None, "sha256": None}
        try:
            entry["bytes"] = os.path.getsize(path)
            entry["sha256"] = sha256_file(path)
        except OSError as e:
            entry["error"] = f"{type(e).__name__}: {e.strerror or e}"
        out.append(entry)
    return out


def package_versions(names=PACKAGES) -> dict:
    """Installed versions; torch's is ``torch.__version__`` with its build tag (``+cpu``, ``+cu130``): the
    same release number is a different build, and the installer's metadata often drops the tag."""
    versions = {}
    for name in names:
        if name == "torch":
            versions[name] = str(torch.__version__)
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+modified" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def device_description(device: torch.device) -> dict:
    """This process's device: name, and for CUDA capability and memory."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "index": index, "name": props.name,
                "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2 ** 30, 2)}
    return {"type": device.type, "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _all_process_devices(device: torch.device) -> list[dict]:
    mine = dict(device_description(device), host=socket.gethostname())
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _software() -> dict:
    cudnn = torch.backends.cudnn
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
    }


def _determinism() -> dict:
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


def _batches(args, world_size: int) -> dict:
    batch = int(args.batch_size)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    return {"per_process": batch, "gradient_accumulation_steps": accumulation,
            "micro_batch": batch // accumulation, "global": batch * world_size,
            "eval_per_process": int(getattr(args, "batch_size_val", 0) or 0)}


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _precision(args, precision) -> dict:
    """--precision / --eval_precision and what the start-up CPU settings chose (runtime.cpu): the
    attention backends and the fp32 product path decide the last digits of the numbers."""
    from modules.backends import backend_name

    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return {"flag": getattr(args, "precision", None),
            "autocast_dtype": _dtype_name(getattr(precision, "dtype", None)),
            "grad_scaler": bool(getattr(precision, "use_scaler", False)),
            "eval_flag": getattr(args, "eval_precision", None),
            "eval_text_dtype": _dtype_name(getattr(precision, "eval_text_dtype", None)),
            "eval_video_dtype": _dtype_name(getattr(precision, "eval_video_dtype", None)),
            "cpu_tuning": getattr(args, "cpu_tuning", None),
            "attention": {"train": backend_name(getattr(precision, "train_attention", None)),
                          "eval": backend_name(getattr(precision, "eval_attention", None)),
                          "flag": getattr(args, "attention_backend", None),
                          "source": _attention_source(args, precision)},
            "fp32_products": {"path": getattr(precision, "fp32_path", None),
                              "source": getattr(precision, "fp32_source", None) or (
                                  "measured at start-up" if getattr(precision, "fp32_path", None) else None)},
            "kernels": getattr(precision, "kernels", None),  # per use: the choice, its source and timings
            "fp32_matmul_precision_onednn": getattr(matmul, "fp32_precision", None),
            "note": getattr(precision, "note", None)}


def _attention_source(args, precision) -> str:
    """Why the run computes attention with the recorded backends."""
    if getattr(precision, "attention_source", None):
        return precision.attention_source
    if getattr(args, "attention_backend", "auto") not in (None, "auto"):
        return "--attention_backend"
    if getattr(precision, "train_attention", None) is None and getattr(precision, "eval_attention", None) is None:
        return "PyTorch's choice"
    return "measured at start-up"


def _training_options(args) -> dict:
    """Options that change memory and speed, not the loss (equal to float tolerance)."""
    return {name: getattr(args, name, None) for name in ("contrastive_chunk_size", "grad_checkpointing", "compile")}


def _splits(args) -> set:
    splits = {"test"}
    if getattr(args, "do_train", 0) or getattr(args, "save_sim_matrix", False):
        splits.add("train")  # training, or the QB-norm query bank
    return splits


def build_record(args, world_size: int, device: torch.device, precision=None, devices=None) -> dict:
    """The record as a dict (``devices``: one description per process; default: this process only)."""
    return {
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "software": _software(),
        "world_size": int(world_size),
        "devices": devices if devices is not None else [device_description(device)],
        "batch": _batches(args, world_size),
        "precision": _precision(args, precision),
        "training_options": _training_options(args),
        "seed": getattr(args, "seed", None),
        "determinism": _determinism(),
        "input": {name: getattr(args, name, None) for name in INPUT_FIELDS},
        "datatype": getattr(args, "datatype", None),
        "annotation_files": hash_annotation_files(annotation_files(args, _splits(args))),
        "clip_weights": getattr(args, "clip_path", None),
        "resume": getattr(args, "resume", None),
        "init_checkpoint": _init_checkpoint(args),
    }


def _init_checkpoint(args) -> dict | None:
    """--init_checkpoint: the file the run's prompts started from (path, size, sha256) and what it was."""
    path = getattr(args, "init_checkpoint", None)
    if not path:
        return None
    entry = hash_annotation_files([path])[0]
    entry.update(getattr(args, "_init_checkpoint_info", None) or {})
    return entry


def write_run_record(args, info, precision, out_dir: str) -> dict | None:
    """Write ``<out_dir>/reproducibility.json`` (main process; every process must call it, since the
    device names of all processes are gathered). Returns the record on the main process."""
    from runtime.files import atomic_write_text

    devices = _all_process_devices(info.device)
    if not info.is_main:
        return None
    record = build_record(args, info.world_size, info.device, precision, devices)
    atomic_write_text(os.path.join(out_dir, RECORD_NAME), json.dumps(record, indent=2, default=str) + "\n")
    return record
