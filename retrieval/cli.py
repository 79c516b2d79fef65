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
    q.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss", "faiss-ivf", "faiss-hnsw"],
                   help="auto / exact: the built-in exact search (bounded memory); faiss: faiss's exact index; "
                        "faiss-ivf / faiss-hnsw: approximate, for millions of videos (recall against exact is "
                        "reported); faiss* need faiss-cpu")
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


def fail(message: str) -> None:
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

def _load(args, index_record: dict | None = None):
    """The model of the command line, or (no --clip) the one recorded in the index."""
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
    return load_model(clip, ckpt, bpe, flags, _device(args.device))


def _encoding_settings(model, device, workers: int, precision: str, kernels: dict | None = None):
    """main.py's start-up choices for encoding videos (runtime.cpu): compute threads next to the decoding
    workers, and on CPU the fp32 product path and the attention backend (measured in about a second), or
    ``kernels``, the choices recorded in the index on this device type, so that every entry is computed
    the same way."""
    from retrieval.encode import autocast_dtype
    from runtime.cpu import available_cores, inference_settings

    bf16 = autocast_dtype(precision, device) is not None
    kernels = kernels or {}
    return inference_settings(model, device, threads=max(1, available_cores() - workers),
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


def cmd_index(args) -> int:
    from modules.backends import backend_name, backends_context, restore
    from retrieval.index import VideoIndex

    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--shard_size", args.shard_size, 1),
                             ("--workers", args.workers, 0)):
        if value < low:
            fail(f"{flag} must be at least {low}, got {value}")
    if not args.checkpoint:
        fail("index needs --checkpoint (the DGL checkpoint training wrote, e.g. OUTPUT_DIR/ckpt.best.pth.tar): "
             "without trained prompts DGL draws them at random on every start, so its features mean nothing "
             "and no later query could use the index")
    segmentation = _segmentation(args)  # None: the index's own, or DEFAULT for a new one (decided under its lock)
    loaded = _load(args)
    device = _device(args.device)
    recorded = _recorded_kernels(args.index)
    if recorded and recorded.get("device") != device.type:  # chosen on another device type: choose anew
        recorded = None
    settings = _encoding_settings(loaded.model, device, args.workers, args.precision, recorded)
    kernels = {"device": device.type, "attention": backend_name(settings.eval_attention),
               "fp32_products": settings.fp32_path}
    try:
        with backends_context(settings.eval_attention):
            index = VideoIndex.build(loaded.model, args.videos, index_dir=args.index, tokenizer=loaded.tokenizer,
                                     batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                                     shard_size=args.shard_size, progress=_progress_wanted(args.no_progress),
                                     model_record=loaded.info, log=_log, segmentation=segmentation,
                                     resize_short_side=None if args.resize_short_side is None
                                     else bool(args.resize_short_side), decoder=args.video_decoder,
                                     kernels=kernels, ranges=args.ranges, new_index_segmentation=DEFAULT)
    finally:
        restore()
    videos = len({e["path"] for e in index.entries})
    print(f"index {args.index}: {len(index)} entries of {videos} videos ({index.segmentation.describe()}) in "
          f"{len(index.shards)} shard(s), {index.record.get('precision', 'fp32')} features")
    print(f"kernels: attention {kernels['attention']}, fp32 products {kernels['fp32_products'] or 'default'} "
          f"({'as recorded in the index' if recorded else 'chosen by timing, recorded in the index'})")
    if index.failed:
        print(f"{len(index.failed)} video(s) or range(s) could not be read and were skipped "
              f"(listed in {os.path.join(args.index, 'failed.json')}):")
        for f in index.failed:
            where = f" {format_range(f['start'], f['end'])}" if f.get("start") is not None else ""
            print(f"  {f['path']}{where}: {f['reason']}")
    return 0


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
    from retrieval.locks import reading

    record = VideoIndex._read_meta(args.index)
    loaded = _load(args, record)
    results = []
    with reading(args.index):  # an index run does not commit while this reads the shards
        index = VideoIndex.open(args.index, model=loaded.model, tokenizer=loaded.tokenizer,
                                fingerprint=loaded.info["fingerprint"])
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
    service = SearchService(args.index, loaded.model, loaded.tokenizer, loaded.info["fingerprint"], log=_log)
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
    from retrieval.model_io import SearchError
    from runtime.files import OutputWriteError

    args = build_parser().parse_args(argv)
    commands = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve, "visualize": cmd_visualize,
                "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except (SearchError, OutputWriteError) as err:  # OutputWriteError: a file (shard, page) could not be written
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; the shards written so far are kept (run the same command to continue)")
    return 1
