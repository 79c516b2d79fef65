"""`search_videos.py serve` under load, and indexing time ranges against decoding them.

Server: an index of N random unit 512-d features (ranges of 50-range videos) served by the server's
application (retrieval.server, uvicorn, one process) on 127.0.0.1, with a DGL of CLIP ViT-B/32's shape
(random weights: the text tower's cost is its shape's). Every request is a new text (the server caches
text features; a repeated text would not be encoded). Reported per size: latency p50/p95 of
``GET /api/search`` with 1 client and with 8 concurrent clients (``--clients 0``: 1 client only),
requests/s with 8, and as the baseline measured in the same run, the text encoder alone (in this process;
as the server runs it, trimmed to the positions the feature depends on, and untrimmed, interleaved).
Also per size: which search answered (``/api/status``: exact, or approximate with its settings and the
recall it measured when built), the server's start-up time (reading the index and, for a large one,
building the approximate search), its peak resident memory (VmHWM), and the recall@10 of the server's
answers against exact search over the same features for ``--recall_queries`` texts (encoded here by the
same model).

Indexing: a generated long video (shots of known length) indexed with ``--segments windows`` and
``shots`` by a tiny DGL and by the ViT-B/32-shaped one, in ranges/s, against decoding the same ranges
only (``load_video(start=, end=)``, no model): the ratio says how much of indexing is decoding. The ranges
are the index's own plan of the file (frame boundaries, as a new index plans and reads them), and the
benchmark checks that the index holds exactly those.

    python benchmarks/bench_server.py                          # 10k and 100k ranges, 8 clients
    python benchmarks/bench_server.py --sizes 10000 --requests 80 --skip_indexing
    python benchmarks/bench_server.py --sizes 1000000 --clients 0 --requests 200 --skip_indexing
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("person", "dog", "car", "ball", "kitchen", "street", "guitar", "cat", "river", "bicycle", "child", "phone")
VERBS = ("plays with", "walks past", "cooks", "throws", "looks at", "rides", "holds", "paints")


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {WORDS[rng.integers(len(WORDS))]} {VERBS[rng.integers(len(VERBS))]} a {WORDS[rng.integers(len(WORDS))]}"
            f" number {i}" for i in range(n)]


def b32_model(bpe: str, seed: int = 0):
    """DGL on a randomly initialised CLIP of ViT-B/32's shape (deterministic from ``seed``)."""
    from modules.clip import CLIP, CLIPConfig
    from modules.dgl import DGL, DGLConfig
    from modules.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(bpe_path=bpe)
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig(vocab_size=max(tokenizer.vocab_size, 512)))
    model = DGL(clip, DGLConfig(max_frames=12)).eval()
    return model, tokenizer


def tiny_model(bpe: str, seed: int = 0):
    from modules.clip import CLIP, tiny_clip_config
    from modules.dgl import DGL, DGLConfig
    from modules.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(bpe_path=bpe)
    torch.manual_seed(seed)
    clip = CLIP(tiny_clip_config(vocab_size=tokenizer.vocab_size, image_resolution=224, vision_patch_size=32))
    config = DGLConfig(max_frames=12, shared_latent_space="linear", unified_transformer_layers=2)
    return DGL(clip, config).eval(), tokenizer


def write_bpe(folder: str) -> str:
    from modules.tokenizer import write_bpe_vocab

    return write_bpe_vocab(texts(400, 1), os.path.join(folder, "bpe.txt.gz"), num_merges=400)


def random_index(folder: str, n: int, model, shard: int = 8192, seed: int = 0) -> str:
    """An index folder of ``n`` random ranges, recorded as made by ``model``."""
    from retrieval.index import FORMAT, _write_json, transform_record, write_shard
    from retrieval.model_io import describe_model
    from retrieval.segments import Segmentation

    os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
    rng = np.random.default_rng(seed)
    dim = model.clip.config.embed_dim
    for s in range(0, n, shard):
        m = min(shard, n - s)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        entries = [{"path": f"/bench/video{(s + i) // 50:06d}.mp4", "size": 1, "mtime_ns": 1, "duration": 400.0,
                    "num_frames": 10000, "fps": 25.0, "frames_used": [], "start": ((s + i) % 50) * 8,
                    "end": ((s + i) % 50) * 8 + 8, "segment": [(s + i) % 50, 50]} for i in range(m)]
        write_shard(os.path.join(folder, "shards", f"shard-{s // shard:06d}.npz"), torch.from_numpy(x), entries)
    record = describe_model(model)
    _write_json(os.path.join(folder, "index.json"), {
        "format": FORMAT, "model": record, "sampling": transform_record(12, 224),
        "segmentation": Segmentation(mode="windows", window=8, stride=8).to_dict(), "num_videos": n, "dim": dim})
    return folder


def serve_worker(index_dir: str, bpe: str, port: int, threads: int, backend: str = "auto") -> None:
    """The server process: the same seeded model, the index, uvicorn on 127.0.0.1:port."""
    import uvicorn

    from retrieval.server import SearchService, create_app

    torch.set_num_threads(threads)
    model, tokenizer = b32_model(bpe)
    from retrieval.model_io import model_fingerprint

    service = SearchService(index_dir, model, tokenizer, model_fingerprint(model), backend=backend,
                            log=lambda message: print(message, file=sys.stderr, flush=True))
    uvicorn.run(create_app(service, allowed_hosts=["127.0.0.1"]), host="127.0.0.1", port=port, log_level="error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(base: str, queries: list[str], clients: int, time_limit: float) -> tuple[list[float], float, int]:
    """``clients`` threads share ``queries`` (each sent once); latencies (s), wall time, errors."""
    import httpx

    lock = threading.Lock()
    todo = list(queries)
    latencies, errors = [], [0]
    parts = {"encode": [], "search": []}  # the server's own split (Server-Timing), seconds
    deadline = time.time() + time_limit

    def client():
        with httpx.Client(base_url=base, timeout=60) as h:
            while time.time() < deadline:
                with lock:
                    if not todo:
                        return
                    q = todo.pop()
                t = time.perf_counter()
                r = h.get("/api/search", params={"q": q, "k": 10})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        for item in r.headers.get("server-timing", "").split(","):
                            name, _, dur = item.strip().partition(";dur=")
                            if name in parts:
                                parts[name].append(float(dur) / 1e3)
                    else:
                        errors[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drive.parts = parts
    return latencies, time.perf_counter() - start, errors[0]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_recall(base: str, folder: str, model, tokenizer, queries: list[str], k: int = 10) -> float:
    """recall@k of the server's answers against exact search over the index's features (this process
    encodes the texts with the same model; the ranges of the random index never overlap, so the server's
    top-k ranges are its top-k entries)."""
    import httpx

    from modules.tokenizer import tokenize
    from retrieval.index import entry_id, read_shard
    from retrieval.search import exact_topk, recall_at_k

    import glob

    paths = sorted(glob.glob(os.path.join(folder, "shards", "shard-*.npz")))
    ids = tokenize(queries, max_words=model.config.max_words, tokenizer=tokenizer)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.encode_text(ids, prompts=model.prompts()).float(), dim=-1)
    counts = []

    def shard_features():  # entries are not kept: 5M of them would not fit beside the server
        for path in paths:
            features, entries = read_shard(path)
            counts.append(len(entries))
            yield features

    _, rows = exact_topk(feats, shard_features(), k)
    starts = np.cumsum([0] + counts)

    def entry(row: int) -> dict:
        s = int(np.searchsorted(starts, row, side="right") - 1)
        return read_shard(paths[s], entries_only=True)[1][row - starts[s]]

    exact = np.array([[entry_id(entry(r)) for r in row] for row in rows.tolist()])
    with httpx.Client(base_url=base, timeout=120) as h:
        served = np.array([[hit["id"] for hit in h.get("/api/search", params={"q": q, "k": k}).json()["results"]]
                           for q in queries])
    return recall_at_k(served, exact)


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, p)) if xs else float("nan")


def bench_server(args, tmp: str, bpe: str) -> None:
    import httpx

    from modules.tokenizer import tokenize

    model, tokenizer = b32_model(bpe)
    torch.set_num_threads(args.threads)
    ids = [tokenize([t], max_words=model.config.max_words, tokenizer=tokenizer) for t in texts(30, 7)]
    with torch.inference_mode():
        prompts = model.prompts()  # as the server: computed once
        times = {False: [], True: []}  # all 40 positions, and trimmed to those the feature depends on
        for i, x in enumerate(ids):
            for trim in (False, True) if i % 2 else (True, False):  # interleaved, either order first
                t = time.perf_counter()
                model.encode_text(x, prompts=prompts, trim=trim)
                if i:  # the first text warms up
                    times[trim].append(time.perf_counter() - t)
    full_ms, encode_ms = (statistics.median(times[trim]) * 1000 for trim in (False, True))
    print(f"baseline: text encoder alone (ViT-B/32 text tower shape, {args.threads} threads), median "
          f"{encode_ms:.1f} ms as the server runs it (trimmed to the positions the feature depends on; "
          f"{x.argmax().item() + 1 + model.config.text_prompt_length // 2} of "
          f"{model.config.max_words + model.config.text_prompt_length} for the last text), "
          f"{full_ms:.1f} ms untrimmed: {full_ms / encode_ms:.2f}x", flush=True)
    print(f"{'ranges':>8} | {'1 client p50':>12} {'p95':>7} | {'8 clients p50':>13} {'p95':>7} {'req/s':>6} | "
          f"{'p95 / encoder':>13} | errors | start-up s | peak RSS MiB | recall@10 | search")
    for n in args.sizes:
        t = time.perf_counter()
        folder = os.path.join(args.index_dir or tmp, f"idx{n}")
        if not os.path.isfile(os.path.join(folder, "index.json")):
            random_index(folder, n, model)
        made_s = time.perf_counter() - t
        port = free_port()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve_worker", folder, "--bpe_path", bpe,
                                 "--port", str(port), "--threads", str(args.threads), "--backend", args.backend],
                                cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        status, many, wall, e8 = {}, [], float("nan"), 0
        try:
            deadline = time.time() + args.start_limit
            while time.time() < deadline and proc.poll() is None:
                try:
                    r = httpx.get(base + "/api/status", timeout=5)
                    if r.status_code == 200:
                        status = r.json()
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            startup_s = time.perf_counter() - started
            drive(base, texts(8, 99 + n), 1, 60)  # warm-up
            single, _, e1 = drive(base, texts(args.requests // 4 if args.clients else args.requests, 11 + n), 1,
                                  args.time_limit)
            split = dict(drive.parts)
            if args.clients:
                many, wall, e8 = drive(base, texts(args.requests, 12 + n), args.clients, args.time_limit)
            recall = server_recall(base, folder, model, tokenizer, texts(args.recall_queries, 13 + n)) \
                if args.recall_queries else float("nan")
            peak = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        search = status.get("search", {})
        described = search.get("mode", "?") + ("" if search.get("mode") != "approximate" else
                                               f" ({search.get('kind')}; nprobe {search.get('nprobe')}/"
                                               f"{search.get('nlist')}, refine {search.get('refine')}; built in "
                                               f"{search.get('build_seconds')} s, recall@10 at build "
                                               f"{search.get('recall_at_10')}; faiss file "
                                               f"{search.get('index_mib')} MiB)")
        many_cols = (f"{pct(many, 50):>10.1f} ms {pct(many, 95):>4.1f} ms {len(many) / wall:>6.1f}" if many
                     else f"{'-':>13} {'-':>7} {'-':>6}")
        ratio = pct(many, 95) / encode_ms if many else pct(single, 95) / encode_ms
        print(f"{n:>8} | {pct(single, 50):>9.1f} ms {pct(single, 95):>4.1f} ms | {many_cols} | {ratio:>13.1f} | "
              f"{e1 + e8:>6} | {startup_s:>10.1f} | {peak:>12.0f} | {recall:>9.3f} | {described}  "
              f"(index written in {made_s:.0f} s)", flush=True)
        print(f"{'':>8}   1 client, the server's split (Server-Timing): text encoding p50 {pct(split['encode'], 50):.1f} / "
              f"p95 {pct(split['encode'], 95):.1f} ms, search p50 {pct(split['search'], 50):.1f} / p95 "
              f"{pct(split['search'], 95):.1f} ms", flush=True)


INDEX_RANGES = "frames"  # a new index's range boundaries (VideoIndex.build's default)


def index_ranges(video: str, seg, decoder: str = "decord") -> list[tuple]:
    """[(start, end)] seconds: the ranges a new index encodes of ``video`` under ``seg``, planned by the
    index's own planning (retrieval.encode.FilePlans: the file's frames and rate probed, boundaries at frames)."""
    from retrieval.encode import FilePlans

    plan = FilePlans([video], seg, decoder, INDEX_RANGES)[0]
    if "error" in plan:
        raise RuntimeError(f"{video}: {plan['error']}")
    return [tuple(r) for r in plan["ranges"]]


def bench_indexing(args, tmp: str, bpe: str) -> None:
    from dataloaders.video import KeptReader
    from preprocess.ffmpeg_tools import write_video
    from retrieval.encode import read_for_model
    from retrieval.index import VideoIndex
    from retrieval.segments import Segmentation

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 12, size=args.shots)]
    fps, size = 25, 256
    frames = []
    for length in lengths:
        colour = rng.integers(0, 255, size=3).astype(np.uint8)
        base = np.empty((size, size, 3), np.uint8)
        base[:] = colour
        for j in range(length * fps):
            f = base.copy()
            x = (j * 3) % (size - 40)
            f[100:140, x:x + 40] = 255 - colour
            frames.append(f)
    video = write_video(os.path.join(tmp, "long", "long.mp4"), np.stack(frames), fps=float(fps), crf=23)
    del frames
    duration = sum(lengths)
    print(f"\nindexing one {duration} s video ({size}x{size}, {fps} fps, {len(lengths)} shots), workers "
          f"{args.workers}, {args.threads} threads")
    print(f"{'segments':>8} {'model':>6} {'ranges':>6} | {'decode only':>11} | {'index':>9} | {'index / decode':>14}")
    for mode in ("windows", "shots"):
        seg = Segmentation(mode=mode, window=8, stride=4, min_len=2, max_len=20)
        t = time.perf_counter()
        ranges = index_ranges(video, seg)
        plan_s = time.perf_counter() - t
        t = time.perf_counter()
        kept = KeptReader()  # as the index's decoding: one open reader for the file's ranges, read to the frame
        for a, b in ranges:
            read_for_model(video, 12, 224, a, b, ranges=INDEX_RANGES, kept=kept)
        decode_rate = len(ranges) / (time.perf_counter() - t)
        for name, make in (("tiny", tiny_model), ("B/32", b32_model)):
            model, tokenizer = make(bpe)
            t = time.perf_counter()
            index = VideoIndex.build(model, [video], index_dir=os.path.join(tmp, f"ix-{mode}-{name}"), precision="fp32",
                                     workers=args.workers, batch_size=4, log=None, segmentation=seg,
                                     ranges=INDEX_RANGES)
            rate = len(index) / (time.perf_counter() - t)
            encoded = [(e["start"], e["end"]) for e in index.entries]
            if encoded != ranges:  # else the two rates would not be of the same ranges
                raise RuntimeError(f"the index encoded {len(encoded)} ranges, not the {len(ranges)} decoded")
            print(f"{mode:>8} {name:>6} {len(index):>6} | {decode_rate:>7.2f} r/s | {rate:>5.2f} r/s | "
                  f"{rate / decode_rate:>14.2f}" + (f"   (shot detection alone: {plan_s:.1f} s)" if mode == "shots"
                                                    else ""), flush=True)


def main() -> int:
    from runtime.errors import finite_float

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the second run (0: none)")
    p.add_argument("--index_dir", default=None, help="keep the random indexes (and their approximate search) "
                                                     "in this folder and reuse them on the next run")
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "approximate"], help="the server's --backend")
    p.add_argument("--recall_queries", type=int, default=50,
                   help="texts whose server answers are compared with exact search (0: no recall check)")
    p.add_argument("--start_limit", type=finite_float, default=3600.0,
                   help="seconds at most for the server to start (reading the index, building its search)")
    p.add_argument("--requests", type=int, default=160, help="requests with --clients clients (a quarter with 1)")
    p.add_argument("--time_limit", type=finite_float, default=120.0, help="seconds at most per load run")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--workers", type=int, default=1, help="decoding processes while indexing")
    p.add_argument("--shots", type=int, default=12, help="shots in the indexing video")
    p.add_argument("--skip_indexing", action="store_true")
    p.add_argument("--skip_server", action="store_true")
    p.add_argument("--bpe_path", default=None)
    p.add_argument("--serve_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_worker:
        serve_worker(args.serve_worker, args.bpe_path, args.port, args.threads, args.backend)
        return 0
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; cpu flags: "
          + " ".join(sorted({f for f in ("avx512_bf16", "amx_bf16") if f in open("/proc/cpuinfo").read()})))
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        bpe = args.bpe_path or write_bpe(tmp)
        if not args.skip_server:
            bench_server(args, tmp, bpe)
        if not args.skip_indexing:
            bench_indexing(args, tmp, bpe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
