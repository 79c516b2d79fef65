"""A tiny searchable world for the search tests: generated videos, a tiny CLIP file, a BPE file and
a DGL checkpoint in our format (recording its model flags)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from modules.clip import CLIP, tiny_clip_config
from modules.dgl import DGL
from modules.tokenizer import get_tokenizer, write_bpe_vocab
from preprocess.ffmpeg_tools import write_video
from preprocess.make_synthetic_dataset import make_specs, render_clip
from modules.checkpoints import FORMAT, with_module_prefix

CONFIG = dict(shared_latent_space="linear", max_words=16, max_frames=4, text_prompt_length=4,
              local_each_frame_prompt_length=2, global_visual_prompt_length=2, unified_transformer_layers=2)
NUM_VIDEOS = 6


@dataclass
class World:
    root: str
    videos: str      # folder of NUM_VIDEOS videos, half of them in a subfolder
    clip: str
    checkpoint: str
    bpe: str
    specs: list

    def model(self, checkpoint: str | None = None):
        from retrieval.model_io import load_model

        return load_model(self.clip, checkpoint or self.checkpoint, self.bpe)

    def copy_videos(self, dest: str) -> str:
        shutil.copytree(self.videos, dest)
        return dest

    def model_args(self, checkpoint: str | None = None) -> list[str]:
        return ["--clip", self.clip, "--checkpoint", checkpoint or self.checkpoint, "--bpe_path", self.bpe,
                "--device", "cpu"]


def save_checkpoint(model: DGL, path: str, bpe: str, config: dict) -> str:
    torch.save({"epoch": 1, "state_dict": with_module_prefix(model.state_dict()), "format": FORMAT,
                "config": {**config, "bpe_path": bpe}}, path)
    return path


def make_world(root: str) -> World:
    specs = make_specs(0, NUM_VIDEOS, seed=5, size=32)
    videos = os.path.join(root, "videos")
    for j, spec in enumerate(specs):
        folder = os.path.join(videos, "more") if j % 2 else videos
        write_video(os.path.join(folder, spec.video_id + ".mp4"), render_clip(spec), fps=3.0)
    bpe = write_bpe_vocab([s.caption(t) for s in specs for t in range(3)], os.path.join(root, "bpe.txt.gz"),
                          num_merges=60)
    vocab = get_tokenizer(bpe_path=bpe).vocab_size
    torch.manual_seed(0)
    clip_path = os.path.join(root, "tiny-clip.pt")
    torch.save(CLIP(tiny_clip_config(vocab_size=vocab)).state_dict(), clip_path)
    model = DGL.from_pretrained(clip_path, **CONFIG)
    with torch.no_grad():  # trained-looking prompts: not the initial values
        for _, p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(model, os.path.join(root, "ckpt.pth.tar"), bpe, CONFIG)
    return World(root, videos, clip_path, ckpt, bpe, specs)


# search_videos.py in a process of its own (run as a file: plain python or under torchrun), computing with
# fixed kernels: the CLI would time each candidate, and kernels round differently, so that the runs a test
# compares would not compute the same way. No candidate but PyTorch's defaults (its attention choice, MKL
# fp32 products) is offered, and a timing would fail. Faults on demand, by environment variable:
#   KILL_AT + KILL_NAME: SIGKILL once half of the KILL_AT-th write of a file whose name ends in KILL_NAME has
#                        reached the disk (a torn temporary file);
#   KILL_RANK + KILL_SHARD: the process of that rank sends itself SIGKILL while writing its KILL_SHARD-th shard;
#   FULL_RANK: that rank's shard writes fail with ENOSPC.
SEARCH_VIDEOS_SCRIPT = r"""
import errno, io, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import modules.backends as backends
from modules.backends import Fp32Check
backends._cached_attention_times = lambda shape, dtype, threads: {(b, d): 1.0 for b in ("math", "flash")
                                                                  for d in ("eval", "train")}
backends._cached_fp32_check = lambda threads: Fp32Check(exact=False, error_mkl=0.0, error_onednn=0.0, speedup=0.0)
backends.time_candidates = None
import retrieval.index as index_module
rank = os.environ.get("RANK", "0")
kill_at, kill_name = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_NAME", "")
real_atomic_write, real_write_shard, writes, shards = index_module.atomic_write, index_module.write_shard, [0], [0]

def atomic_write(path, write_fn, mode="wb"):
    if kill_at and os.path.basename(path).endswith(kill_name):
        writes[0] += 1
        if writes[0] == kill_at:
            def torn(f):
                buf = io.BytesIO() if "b" in mode else io.StringIO()
                write_fn(buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_atomic_write(path, torn, mode)
    return real_atomic_write(path, write_fn, mode)

def write_shard(path, features, entries):
    if rank == os.environ.get("FULL_RANK"):
        def full(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return index_module.atomic_write(path, full)
    if rank == os.environ.get("KILL_RANK"):
        shards[0] += 1
        if shards[0] == int(os.environ["KILL_SHARD"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_write_shard(path, features, entries)

index_module.atomic_write = atomic_write
index_module.write_shard = write_shard
sys.argv = ["search_videos.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.getcwd(), "search_videos.py"), run_name="__main__")
"""


def write_search_videos_script(folder) -> str:
    """SEARCH_VIDEOS_SCRIPT as a file in ``folder``; run it with the repository as the working folder."""
    path = os.path.join(str(folder), "run_search_videos.py")
    with open(path, "w") as f:
        f.write(SEARCH_VIDEOS_SCRIPT)
    return path


SHOT_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (200, 60, 220), (40, 220, 220)]


def render_shots(lengths_s, fps: int = 5, size: int = 32, seed: int = 0):
    """uint8 frames (T, size, size, 3) of shots ``lengths_s`` seconds long, each a flat colour of its own
    with a small square moving on it, and the cut times (seconds) between them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames, cuts, t = [], [], 0
    for i, length in enumerate(lengths_s):
        n = int(round(length * fps))
        colour = np.array(SHOT_COLOURS[i % len(SHOT_COLOURS)], np.uint8)
        for j in range(n):
            f = np.empty((size, size, 3), np.uint8)
            f[:] = colour
            x = (j * 2 + int(rng.integers(0, 3))) % (size - 6)
            f[10:16, x:x + 6] = 255 - colour
            frames.append(f)
        t += n
        cuts.append(t / fps)
    return np.stack(frames), cuts[:-1]


def write_shots_video(path: str, lengths_s, fps: int = 5, size: int = 32) -> tuple[str, list[float]]:
    frames, cuts = render_shots(lengths_s, fps, size)
    write_video(path, frames, fps=float(fps))
    return path, cuts


@contextlib.contextmanager
def served_in_chromium(index_dir: str):
    """`search_videos.py serve --index index_dir` in its own process on a free 127.0.0.1 port, and a headless
    Chromium driven by selenium; yields (the server's base URL, the browser) once the server answers. Skips
    the test without selenium, Debian's chromium or chromium-driver."""
    import httpx
    import pytest

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("needs Debian's chromium and chromium-driver")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "search_videos.py"), "serve", "--index", index_dir,
                             "--port", str(port), "--device", "cpu"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/api/status", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("serve did not start: " + (proc.stdout.read() if proc.poll() is not None else ""))
        browser = webdriver.Chrome(service=Service(driver_bin), options=options)
        browser.set_page_load_timeout(30)
        yield base, browser
    finally:
        if browser is not None:
            browser.quit()
        proc.terminate()
        proc.wait(timeout=30)


def search_on_page(browser, base: str, query: str, k: int) -> list:
    """Types ``query`` and ``k`` into the page at ``base``, clicks search; returns the result cards."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{base}/")
    browser.find_element(By.ID, "q").send_keys(query)
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(k))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) > 0)
    return browser.find_elements(By.CSS_SELECTOR, ".card")


def assert_plays_within_its_range(browser, video, timeout: float = 60) -> None:
    """The page's ``video`` element, started (muted), plays from inside its data-start..data-end range."""
    from selenium.webdriver.support.ui import WebDriverWait

    start, end = float(video.get_attribute("data-start")), float(video.get_attribute("data-end"))
    WebDriverWait(browser, timeout).until(lambda b: b.execute_script("return arguments[0].readyState", video) >= 1)
    browser.execute_script("arguments[0].muted = true; arguments[0].play()", video)
    WebDriverWait(browser, timeout).until(
        lambda b: b.execute_script("return arguments[0].currentTime", video) > start)
    now = browser.execute_script("return arguments[0].currentTime", video)
    assert start <= now <= end + 0.5, (start, now, end)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """search_videos.py in this process: (exit status, stdout, stderr)."""
    from retrieval.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(argv, capsys, *needles) -> str:
    """Run search_videos.py; it must end with status 2 and one line ``search_videos.py: error: ...`` that
    holds every needle. Returns the line."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search_videos.py: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
