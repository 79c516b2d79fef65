"""``search_videos.py``: index a folder of videos, query it by text or by video, draw attention pictures.

    python search_videos.py index  VIDEOS... --index IDX --clip CLIP.pt --checkpoint CKPT [--segments shots]
    python search_videos.py query  "a text" ... --index IDX [-k 10] [--per_video N] [--json out.json] [--html page.html]
    python search_videos.py query  --video clip.mp4 --index IDX
    python search_videos.py serve  --index IDX [--host 127.0.0.1] [--port 8000] [--token T | --no_auth]
    python search_videos.py visualize VIDEO --clip CLIP.pt --checkpoint CKPT [--caption TEXT] --out pic.png
    python search_videos.py evaluate --index IDX --queries FILE [--qb_norm BANK] [--by_video] [--json ranks.json]

Every bad input ends with one line ``search_videos.py: error: ...`` and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

from retrieval.segments import MODES, Segmentation, format_range
from runtime.compilation import compile_choice
from runtime.errors import OneLineArgumentParser, finite_float
from runtime.model_flags import add_model_flags

DEFAULT = Segmentation()

PROG = "search_videos.py"
TOKEN_ENV = "DGL_SEARCH_TOKEN"  # serve's token when neither --token nor --token_file is given


def _add_model_flags(p, required: bool) -> None:
    g = p.add_argument_group("model (for query: taken from the index unless given)")
    g.add_argument("--clip", required=required, help="CLIP weights: OpenAI's ViT-B-32.pt / ViT-B-16.pt or a state dict")
    g.add_argument("--checkpoint", default=None, help="DGL checkpoint (ours or an official one)")
    g.add_argument("--bpe_path", default=None, help="CLIP's BPE vocabulary (default: next to --clip, "
                                                    "the checkpoint's, $DGL_BPE_PATH)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # main.py's model flags (DGLConfig's fields): needed for official checkpoints; ours record them
    add_model_flags(g, defaults=False)


def _add_approximate_from(p) -> None:
    from retrieval.approximate import APPROXIMATE_FROM

    p.add_argument("--approximate_from", type=int, default=APPROXIMATE_FROM,
                   help=f"--backend auto searches approximately from this many entries (default {APPROXIMATE_FROM})")


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description="Search your own videos with a trained DGL.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)

    ix = sub.add_parser("index", help="encode a folder of videos into an index folder (incremental, resumable)")
    ix.add_argument("videos", nargs="+", help="video files or folders (searched recursively)")
    ix.add_argument("--index", required=True, help="index folder (created or updated)")
    ix.add_argument("--batch_size", type=int, default=8)
    ix.add_argument("--workers", type=int, default=2, help="video decoding processes (0: in the main process)")
    ix.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where the GPU or CPU computes it natively (AMX / AVX512-BF16), else fp32")
    ix.add_argument("--shard_size", type=int, default=256, help="entries per shard file (the resume granularity)")
    ix.add_argument("--compile", type=compile_choice, nargs="?", const=1, default=0, choices=[0, 1, "auto"],
                    help="torch.compile the video encoder: faster encoding after minutes of compilation per process "
                         "(seconds where the compile cache holds the shape); features equal to float rounding "
                         "(recorded in the index: its later runs need the same choice). auto (for long jobs): "
                         "compile when the run has enough ranges for the gain to cover the compilation, one log "
                         "line says which; an index that records a choice keeps it. Bare --compile = 1")
    ix.add_argument("--threads", type=int, default=None,
                    help="compute threads of each process (default: its cores, those of the machine shared among "
                         "the processes torchrun starts on it, less --workers)")
    ix.add_argument("--no_progress", action="store_true")
    sg = ix.add_argument_group("time ranges (recorded in the index; an update takes the recorded ones)")
    sg.add_argument("--segments", choices=list(MODES), default=None,
                    help="whole: one feature per file; shots: PySceneDetect shots merged/split to --min_len.."
                         "--max_len seconds; windows: --window seconds every --stride; auto (default for a new "
                         "index): whole up to --whole_up_to seconds, shots above")
    sg.add_argument("--min_len", type=int, default=None, help=f"shots: shortest range, seconds (default {DEFAULT.min_len})")
    sg.add_argument("--max_len", type=int, default=None, help=f"shots: longest range, seconds (default {DEFAULT.max_len})")
    sg.add_argument("--window", type=int, default=None, help=f"windows: length, seconds (default {DEFAULT.window})")
    sg.add_argument("--stride", type=int, default=None, help=f"windows: step, seconds (default {DEFAULT.stride})")
    sg.add_argument("--whole_up_to", type=int, default=None,
                    help=f"auto: files up to this many seconds are one range (default {DEFAULT.whole_up_to})")
    sg.add_argument("--shot_threshold", type=finite_float, default=None,
                    help=f"shots: PySceneDetect ContentDetector threshold (default {DEFAULT.threshold:g})")
    sg.add_argument("--scales", type=int, default=None,
                    help=f"shots / windows: also index runs of 2..N consecutive shots (windows N times as long), "
                         f"so that a range fits a longer moment (default {DEFAULT.scales}; 1: one range per shot)")
    sg.add_argument("--ranges", choices=["frames", "seconds"], default=None,
                    help="frames (default for a new index): range boundaries are frames, each range read to the "
                         "frame; seconds: whole seconds read by the datasets' span rule (indexes made before)")
    px = ix.add_argument_group("pixels (recorded in the index; as main.py's flags of the same names)")
    px.add_argument("--resize_short_side", type=int, choices=[0, 1], default=None,
                    help="1: scale the short side to the model's input size before the centre crop (default 0)")
    px.add_argument("--video_decoder", choices=["decord", "pyav"], default=None, help="default decord")
    _add_model_flags(ix, required=True)

    q = sub.add_parser("query", help="top-k videos for texts or for a video")
    q.add_argument("texts", nargs="*", help="query texts")
    q.add_argument("--index", required=True)
    q.add_argument("--queries_file", default=None, help="a text file, one query per line")
    q.add_argument("--video", default=None, help="a video as the query: the most similar videos")
    q.add_argument("-k", "--top_k", type=int, default=10, help="results (time ranges) per query")
    q.add_argument("--per_video", type=int, default=None, help="at most this many ranges of one video")
    q.add_argument("--backend", default="auto", choices=["auto", "exact", "approximate", "faiss", "faiss-ivf",
                                                         "faiss-hnsw"],
                   help="auto: exact below --approximate_from entries, approximate from there; exact: the built-in "
                        "exact search (bounded memory); approximate: the index's approximate search (built once, "
                        "kept beside the shards; its measured recall is printed); faiss: faiss's exact index; "
                        "faiss-ivf / faiss-hnsw: other approximate indexes; all but exact need faiss-cpu")
    _add_approximate_from(q)
    q.add_argument("--json", default=None, help="write the results as JSON to this file ('-': stdout, no table)")
    q.add_argument("--html", default=None, help="write a self-contained results page")
    _add_model_flags(q, required=False)

    sv = sub.add_parser("serve", help="a local search page and JSON API over an index")
    sv.add_argument("--index", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token", default=None, help="every request must carry it (Authorization: Bearer T, "
                                                  "or ?token=T in the page's address); visible to every user "
                                                  f"of the machine in `ps`: prefer --token_file or ${TOKEN_ENV}")
    sv.add_argument("--token_file", default=None, help="read the token from this file (its first line)")
    sv.add_argument("--no_auth", action="store_true", help="allow binding off loopback without --token")
    sv.add_argument("--backend", default="auto", choices=["auto", "exact", "approximate"],
                    help="auto: exact below --approximate_from entries, approximate from there (needs faiss-cpu); "
                         "exact or approximate: always that one")
    _add_approximate_from(sv)
    _add_model_flags(sv, required=False)

    v = sub.add_parser("visualize", help="a PNG of what the global prompts attend to in a video")
    v.add_argument("video")
    v.add_argument("--out", required=True, help="the PNG to write")
    v.add_argument("--caption", default=None, help="also plot this caption's similarity to each frame")
    v.add_argument("--layer", type=int, default=-1, help="vision layer (negative counts from the end; default last)")
    v.add_argument("--prompt", type=int, default=None, help="one global prompt (default: their mean)")
    v.add_argument("--index", default=None, help="take the model (CLIP, checkpoint, flags) from this index")
    _add_model_flags(v, required=False)

    from retrieval.evaluate import add_evaluate_parser
    add_evaluate_parser(sub, _add_model_flags)
    return p


_SILENT = {"errors": False}  # a process of a group other than process 0: process 0 reports the group's errors


def fail(message: str) -> None:
    if not _SILENT["errors"]:
        sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    return torch.device(name)


def _model_flags(args) -> dict:
    from runtime.model_flags import MODEL_FLAGS

    return {k: getattr(args, k, None) for k in MODEL_FLAGS}



def _progress_wanted(no_progress: bool) -> bool:
    """A progress bar for a person watching: not with --no_progress, not when stderr goes to a file or pipe."""
    return not no_progress and sys.stderr.isatty()

def _load(args, index_record: dict | None = None, device=None):
    """The model of the command line, or (no --clip) the one recorded in the index; on ``device`` (default:
    --device's)."""
    from retrieval.model_io import load_model

    clip, ckpt, bpe, flags = args.clip, args.checkpoint, args.bpe_path, _model_flags(args)
    if index_record is not None:
        model = index_record["model"]
        if clip is None:
            clip, ckpt = model.get("clip_weights"), ckpt or model.get("checkpoint")
        bpe = bpe or model.get("bpe_path")
        flags = {**model.get("dgl_config", {}), **{k: v for k, v in flags.items() if v is not None}}
    if clip is None:
        fail("give the model: --clip CLIP.pt --checkpoint CKPT (or --index of an index built with it)")
    return load_model(clip, ckpt, bpe, flags, device if device is not None else _device(args.device))


def _encoding_settings(model, device, workers: int, precision: str, kernels: dict | None = None,
                       threads: int | None = None):
    """main.py's start-up choices for encoding videos (runtime.cpu): compute threads next to the decoding
    workers (``threads``, default: this process's cores less the workers; torchrun's processes on one
    machine share its cores), and on CPU the fp32 product path and the attention backend (measured in
    about a second), or ``kernels``, the choices recorded in the index on this device type (or process 0's
    choices), so that every entry is computed the same way."""
    from retrieval.encode import autocast_dtype
    from runtime.cpu import available_cores, inference_settings, processes_on_this_machine

    bf16 = autocast_dtype(precision, device) is not None
    kernels = kernels or {}
    if threads is None:
        threads = max(1, available_cores() // processes_on_this_machine() - workers)
    return inference_settings(model, device, threads=threads,
                              eval_precision="bf16" if bf16 else "fp32",
                              attention_backend=kernels.get("attention", "auto"), fp32_path=kernels.get("fp32_products"))


def _recorded_kernels(index_dir: str) -> dict | None:
    if not os.path.isfile(os.path.join(index_dir, "index.json")):
        return None
    from retrieval.index import VideoIndex

    try:
        return VideoIndex._read_meta(index_dir).get("kernels")
    except Exception:  # noqa: BLE001 - a damaged index.json is reported by the build itself
        return None


SEGMENT_FLAGS = {"segments": "mode", "min_len": "min_len", "max_len": "max_len", "window": "window",
                 "stride": "stride", "whole_up_to": "whole_up_to", "shot_threshold": "threshold", "scales": "scales"}


def _segmentation(args) -> Segmentation | None:
    """The flags' segmentation; None when no flag is given (a new index: auto; an update: the recorded one).
    Flags not given take the index's recorded values, else the defaults."""
    given = {field: getattr(args, flag) for flag, field in SEGMENT_FLAGS.items() if getattr(args, flag) is not None}
    if not given:
        return None
    base = DEFAULT.to_dict()
    meta_path = os.path.join(args.index, "index.json")
    if os.path.isfile(meta_path):
        from retrieval.index import VideoIndex, recorded_segmentation

        base = recorded_segmentation(VideoIndex._read_meta(args.index)).to_dict()
    seg = Segmentation(**{**base, **given})
    try:
        seg.check()
    except ValueError as err:
        fail(str(err))
    return seg


# flags that may differ between the processes of one run (they change nothing in the index)
LOCAL_FLAGS = ("no_progress",)


def _join_index_group(args):
    """The processes of this run (runtime.group): one, or those torchrun started, which must all have been
    given the same command (refused in one line otherwise, before anything is written)."""
    import hashlib

    import torch

    from retrieval.index import GroupError
    from runtime.group import join, launched_processes

    if launched_processes() == 1:
        from runtime.group import Group

        return Group(), _device(args.device)
    device = _device(args.device)
    group = join(cuda=device.type == "cuda")
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in LOCAL_FLAGS}
    digest = hashlib.sha256(json.dumps(flags, default=str).encode()).hexdigest()
    everyone = group.gather((digest, flags))
    _SILENT["errors"] = not group.is_main  # from here on process 0 speaks for the group
    for rank, (other, theirs) in enumerate(everyone):
        if other != everyone[0][0]:
            ours = everyone[0][1]
            differ = [f"{'the videos' if k == 'videos' else '--' + k} {_shown(theirs.get(k))} "
                      f"(process 0: {_shown(ours.get(k))})" for k in sorted(set(ours) | set(theirs))
                      if ours.get(k) != theirs.get(k)]
            raise GroupError(f"process {rank} of {group.world_size} was started with other flags than process 0: "
                             f"{', '.join(differ)}; start every process with the same command (nothing was "
                             "written)")
    return group, device


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def cmd_index(args) -> int:
    from modules.backends import backend_name, backends_context, restore
    from retrieval.index import GroupError, VideoIndex
    from retrieval.model_io import SearchError

    group, device = _join_index_group(args)
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--shard_size", args.shard_size, 1),
                             ("--workers", args.workers, 0), ("--threads", 1 if args.threads is None else args.threads, 1)):
        if value < low:
            fail(f"{flag} must be at least {low}, got {value}")
    if not args.checkpoint:
        fail("index needs --checkpoint (the DGL checkpoint training wrote, e.g. OUTPUT_DIR/ckpt.best.pth.tar): "
             "without trained prompts DGL draws them at random on every start, so its features mean nothing "
             "and no later query could use the index")
    segmentation = _segmentation(args)  # None: the index's own, or DEFAULT for a new one (decided under its lock)
    loaded, problem = None, None
    try:
        loaded = _load(args, device=device)
    except SearchError as err:
        if not group.distributed:
            raise
        problem = str(err)
    if group.distributed:  # every process loads the same model, or none starts
        answers = group.gather(("error", problem) if problem else ("model", loaded.info["fingerprint"]))
        for rank, (kind, value) in enumerate(answers):
            if kind == "error":
                raise GroupError(f"process {rank} of {group.world_size}: {value}")
            if value != answers[0][1]:
                raise GroupError(f"process {rank} of {group.world_size} loaded another model (fingerprint "
                                 f"{value[:12]}) than process 0 ({answers[0][1][:12]}): every machine needs the same "
                                 "--clip and --checkpoint files")
    recorded = _recorded_kernels(args.index) if group.is_main else None
    if recorded and recorded.get("device") != device.type:  # chosen on another device type: choose anew
        recorded = None
    answer = None
    if group.is_main:
        compiled = _compile_wanted(args, recorded)  # None: --compile auto, decided by the run (compile_auto)
        if recorded and compiled is not None and bool(recorded.get("compiled")) != compiled:
            answer = ("error", f"the index {args.index} was computed {'with' if recorded.get('compiled') else 'without'}"
                               " --compile (features that differ by float rounding): run "
                               f"{'with' if recorded.get('compiled') else 'without'} it (or with --compile auto, "
                               "which keeps the index's choice), or index into a new folder")
        else:
            settings = _encoding_settings(loaded.model, device, args.workers, args.precision, recorded, args.threads)
            kernels = {"device": device.type, "attention": backend_name(settings.eval_attention),
                       "fp32_products": settings.fp32_path, **({"compiled": True} if compiled else {})}
            answer = ("ok", (kernels, compiled is None))
    kind, value = group.broadcast(answer)  # every process computes as process 0 does
    if kind == "error":
        raise (GroupError if group.distributed else SearchError)(value)
    kernels, auto = value
    if not group.is_main:
        settings = _encoding_settings(loaded.model, device, args.workers, args.precision, kernels, args.threads)
    from retrieval.auto_compile import AutoCompile, index_shape_key
    from retrieval.encode import autocast_dtype

    shape = index_shape_key(loaded.model, device, args.batch_size, autocast_dtype(args.precision, device))
    compiled_shapes = []

    def compile_encoder():
        from retrieval.encode import compile_video_encoder
        from runtime.compilation import use_compile_cache

        use_compile_cache()
        compile_video_encoder(loaded.model, log=_log if group.is_main else None, batch_size=args.batch_size)
        compiled_shapes.append(shape)

    compile_auto = None
    if kernels.get("compiled"):
        compile_encoder()
    elif auto:
        from runtime.compilation import is_warm

        compile_auto = AutoCompile(warm=is_warm(shape), compile=compile_encoder, log=_log if group.is_main else None)
    try:
        with backends_context(settings.eval_attention):
            index = VideoIndex.build(loaded.model, args.videos, index_dir=args.index, tokenizer=loaded.tokenizer,
                                     batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                                     shard_size=args.shard_size,
                                     progress=group.is_main and _progress_wanted(args.no_progress),
                                     model_record=loaded.info, log=_log if group.is_main else None,
                                     segmentation=segmentation,
                                     resize_short_side=None if args.resize_short_side is None
                                     else bool(args.resize_short_side), decoder=args.video_decoder,
                                     kernels=kernels, ranges=args.ranges, new_index_segmentation=DEFAULT,
                                     group=group, compile_auto=compile_auto)
    finally:
        restore()
    if compiled_shapes:  # the compile cache now holds this shape: a later --compile auto run counts on it
        from runtime.compilation import mark_warm

        mark_warm(shape)
    if not group.is_main:
        return 0
    videos = len({e["path"] for e in index.entries})
    print(f"index {args.index}: {len(index)} entries of {videos} videos ({index.segmentation.describe()}) in "
          f"{len(index.shards)} shard(s), {index.record.get('precision', 'fp32')} features")
    print(f"kernels: attention {kernels['attention']}, fp32 products {kernels['fp32_products'] or 'default'} "
          f"({'as recorded in the index' if recorded else 'chosen by timing, recorded in the index'})")
    _approximate_after_indexing(args.index)
    if index.failed:
        print(f"{len(index.failed)} video(s) or range(s) could not be read and were skipped "
              f"(listed in {os.path.join(args.index, 'failed.json')}):")
        for f in index.failed:
            where = f" {format_range(f['start'], f['end'])}" if f.get("start") is not None else ""
            print(f"  {f['path']}{where}: {f['reason']}")
    return 0


def _compile_wanted(args, recorded: dict | None) -> bool | None:
    """--compile 0 / 1, or for auto: the index's recorded choice where it records one on this device type
    (said in one line), else None: the index run decides once it has planned its ranges
    (retrieval.auto_compile.AutoCompile)."""
    if args.compile != "auto":
        return bool(args.compile)
    if recorded:
        from retrieval.auto_compile import recorded_line

        _log(recorded_line(bool(recorded.get("compiled"))))
        return bool(recorded.get("compiled"))
    return None


def _approximate_after_indexing(index_dir: str) -> None:
    """A large index gets its approximate search built now (retrieval.approximate), not at the first query;
    a failure leaves the index as it is (the first search builds it again) and says so."""
    from retrieval.approximate import APPROXIMATE_FROM
    from retrieval.index import VideoIndex
    from retrieval.locks import reading
    from retrieval.model_io import SearchError
    from retrieval.search import faiss_available
    from runtime.files import OutputWriteError

    try:
        with reading(index_dir):
            index = VideoIndex.open(index_dir)
            if len(index) >= APPROXIMATE_FROM and faiss_available():
                index.approximate_search(log=_log)
    except (SearchError, OutputWriteError) as err:
        _log(f"warning: the approximate search was not built ({str(err).splitlines()[0]}); the first search "
             "builds it")


def _read_queries(args) -> list[str]:
    texts = list(args.texts)
    if args.queries_file:
        try:
            with open(args.queries_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as err:
            fail(f"cannot read --queries_file {args.queries_file}: {err.strerror}")
        except UnicodeDecodeError as err:
            fail(f"--queries_file {args.queries_file} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                 f"offset {err.start}): save it as UTF-8")
    return texts


def check_output_files(*paths_and_flags) -> None:
    """Before any work: an output path (``path, flag`` pairs; None: not asked for) that is a folder is
    refused in one line, rather than after the search."""
    for path, flag in zip(paths_and_flags[::2], paths_and_flags[1::2]):
        if path is not None and os.path.isdir(path):
            fail(f"{flag} {path} is a folder: give a file name")


def hit_range(hit) -> str:
    """12:31-12:47; a whole file: 0:00-(its duration)."""
    if hit.start is None:
        return format_range(0, hit.entry.get("duration"))
    return format_range(hit.start, hit.end, hit.entry.get("duration"))


FILE_MARKS = {"gone": "  [deleted since indexed]", "changed": "  [changed since indexed]"}


def format_table(query: str, hits) -> str:
    lines = [f"query: {query}", f"{'rank':>4}  {'score':>7}  {'range':>13}  path"]
    for h in hits:
        lines.append(f"{h.rank:>4}  {h.score:7.4f}  {hit_range(h):>13}  {h.path}{FILE_MARKS.get(h.file, '')}")
    return "\n".join(lines)


def stale_hits_note(hits) -> str | None:
    """One line when hits point to files deleted or changed since they were indexed, else None."""
    stale = {h.path: h.file for h in hits if h.file != "ok"}
    if not stale:
        return None
    gone = sum(1 for state in stale.values() if state == "gone")
    return (f"note: {len(stale)} file(s) among the hits were deleted ({gone}) or changed ({len(stale) - gone}) "
            "since they were indexed (marked; \"file\" in JSON); run `search_videos.py index` again to update "
            "the index")


def _check_approximate_from(args) -> None:
    if args.approximate_from < 1:
        fail(f"--approximate_from must be at least 1, got {args.approximate_from}")


def cmd_query(args) -> int:
    from retrieval.index import VideoIndex

    texts = _read_queries(args)
    check_output_files(args.json if args.json != "-" else None, "--json", args.html, "--html")
    if not texts and not args.video:
        fail("no query: give texts, --queries_file or --video")
    if args.top_k < 1:
        fail(f"-k must be at least 1, got {args.top_k}")
    if args.per_video is not None and args.per_video < 1:
        fail(f"--per_video must be at least 1, got {args.per_video}")
    _check_approximate_from(args)
    from retrieval.locks import reading

    record = VideoIndex._read_meta(args.index)
    loaded = _load(args, record)
    results = []
    with reading(args.index):  # an index run does not commit while this reads the shards
        index = VideoIndex.open(args.index, model=loaded.model, tokenizer=loaded.tokenizer,
                                fingerprint=loaded.info["fingerprint"])
        index.approximate_from = args.approximate_from
        if texts:
            for text, hits in zip(texts, index.search(texts, args.top_k, args.backend, log=_log,
                                                      per_video=args.per_video)):
                results.append({"query": text, "hits": hits})
        if args.video:
            results.append({"query": f"video: {os.path.abspath(args.video)}",
                            "query_video": os.path.abspath(args.video),
                            "hits": index.search_video(args.video, args.top_k, args.backend, log=_log,
                                                      per_video=args.per_video)})
    note = stale_hits_note([h for r in results for h in r["hits"]])
    payload = [{"query": r["query"], "results": [{**h.to_dict(), "range": hit_range(h)} for h in r["hits"]]}
               for r in results]
    if args.json == "-":
        print(json.dumps(payload, indent=1))
    else:
        print("\n\n".join(format_table(r["query"], r["hits"]) for r in results))
        if args.json:
            from retrieval.index import _write_json

            _write_json(args.json, payload)
    if args.html:
        from retrieval.html import write_results_page

        write_results_page(args.html, results, index)
        _log(f"results page: {args.html}")
    if note:
        _log(note)
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_token(args) -> str | None:
    """The token of --token, else of --token_file (its first line), else of $DGL_SEARCH_TOKEN; None."""
    if args.token is not None and args.token_file is not None:
        fail("give --token or --token_file, not both")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as err:
            fail(f"cannot read --token_file {args.token_file}: {err.strerror}")
        except UnicodeDecodeError:
            fail(f"--token_file {args.token_file} is not UTF-8 text")
        if not token:
            fail(f"--token_file {args.token_file}: its first line is empty")
        return token
    if args.token is not None:
        if not args.token.strip():
            fail("--token is empty")
        return args.token
    token = os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        fail(f"${TOKEN_ENV} is set but empty")
    return token.strip() if token else None


def cmd_serve(args) -> int:
    from retrieval.index import VideoIndex

    if not 0 < args.port < 65536:
        fail(f"--port must be 1..65535, got {args.port}")
    _check_approximate_from(args)
    args.token = _server_token(args)
    if args.token and args.no_auth:
        fail("give a token (--token, --token_file or $" + TOKEN_ENV + ") or --no_auth, not both")
    loopback = _is_loopback(args.host)
    if not loopback and not args.token and not args.no_auth:
        fail(f"--host {args.host} is reachable from other machines: give a token (--token_file FILE or "
             f"${TOKEN_ENV}; requests must carry it) or --no_auth (anyone who can reach the port can search and read the indexed videos)")
    from retrieval.server import SearchService, create_app

    record = VideoIndex._read_meta(args.index)
    loaded = _load(args, record)
    service = SearchService(args.index, loaded.model, loaded.tokenizer, loaded.info["fingerprint"], log=_log,
                            backend=args.backend, approximate_from=args.approximate_from)
    # no token on loopback: only this machine's names in the Host header (a rebound domain cannot reach it)
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1", args.host] if loopback and not args.token else None
    app = create_app(service, token=args.token, allowed_hosts=hosts)
    import uvicorn

    access = ("requests must carry the token" if args.token else
              "NO authentication: anyone who can reach this port can search and read the indexed videos"
              if not loopback else "this machine only")
    address = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    _log(f"serving {args.index} ({len(service.index)} entries) on {address} ({access})"
         + (" - open " + address + "?token=<the token>" if args.token else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_visualize(args) -> int:
    from retrieval.pictures import draw_attention

    check_output_files(args.out, "--out")
    record = None
    if args.index:
        from retrieval.index import VideoIndex

        record = VideoIndex._read_meta(args.index)
    loaded = _load(args, record)
    draw_attention(loaded.model, args.video, args.out, caption=args.caption, tokenizer=loaded.tokenizer,
                   layer=args.layer, prompt=args.prompt)
    print(f"attention picture: {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from retrieval.evaluate import cmd_evaluate as evaluate

    check_output_files(args.json, "--json")
    return evaluate(args, _load)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve, "visualize": cmd_visualize,
                "evaluate": cmd_evaluate}
    from runtime.group import exit_now, launched_processes

    if args.command == "index" and launched_processes() > 1:
        # a process of a torchrun launch ends at once with its status (runtime.group.exit_now)
        try:
            status = _run(commands[args.command], args)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a bug: its traceback, then out, so the others are stopped
            import traceback

            traceback.print_exc()
            status = 1
        exit_now(status)
    return _run(commands[args.command], args)


def _run(command, args) -> int:
    from retrieval.model_io import SearchError
    from runtime.files import OutputWriteError

    try:
        return command(args)
    except (SearchError, OutputWriteError) as err:  # OutputWriteError: a file (shard, page) could not be written
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; the shards written so far are kept (run the same command to continue)")
    return 1
