"""preprocess/compress_video.py and the synthetic dataset CLI."""
from __future__ import annotations

import os

import decord
import numpy as np
import pytest

from preprocess.compress_video import compress_tree, list_jobs, main as compress_main, summarize
from preprocess.ffmpeg_tools import write_video
from preprocess.make_synthetic_dataset import main as synthetic_main


@pytest.fixture()
def raw_tree(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    # 2 s at 15 fps, landscape 90x50 (scaled width 57.6 -> even); portrait 40x64 at 10 fps
    write_video(str(raw / "a.mp4"), rng.integers(0, 255, (30, 50, 90, 3), dtype=np.uint8), fps=15)
    write_video(str(raw / "sub" / "b.mp4"), rng.integers(0, 255, (20, 64, 40, 3), dtype=np.uint8), fps=10)
    (raw / "sub" / "broken.avi").write_bytes(b"not a video" * 50)
    (raw / "notes.txt").write_text("ignored")
    return raw


def test_compress_tree(raw_tree, tmp_path):
    out = tmp_path / "out"
    results = compress_tree(str(raw_tree), str(out), fps=3, size=32, workers=2, progress=False)
    status = {os.path.relpath(r.src, raw_tree): r for r in results}
    assert set(status) == {"a.mp4", os.path.join("sub", "b.mp4"), os.path.join("sub", "broken.avi")}
    assert status["a.mp4"].status == "done" and status[os.path.join("sub", "b.mp4")].status == "done"
    broken = status[os.path.join("sub", "broken.avi")]
    assert broken.status == "failed" and "Invalid data" in broken.reason
    assert f"FAILED {broken.src}: " in summarize(results)
    a = decord.VideoReader(str(out / "a.mp4"))
    h, w, _ = a[0].shape
    assert h == 32 and w % 2 == 0 and abs(w - 90 * 32 / 50) <= 2  # short side 32, even width
    assert len(a) == 6 and a.get_avg_fps() == pytest.approx(3.0)
    b = decord.VideoReader(str(out / "sub" / "b.mp4"))
    assert b[0].shape == (52, 32, 3) and len(b) == 6
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".part" in f]
    assert leftovers == [] and not (out / "sub" / "broken.mp4").exists()

    # second run: valid outputs are skipped (not rewritten)
    mtime = os.path.getmtime(out / "a.mp4")
    again = compress_tree(str(raw_tree), str(out), fps=3, size=32, workers=1, progress=False)
    assert sorted(r.status for r in again) == ["failed", "skipped", "skipped"]
    assert os.path.getmtime(out / "a.mp4") == mtime

    # a half-written output from an interrupted run is not valid: it is re-encoded
    (out / "a.mp4").write_bytes((out / "a.mp4").read_bytes()[:100])
    third = compress_tree(str(raw_tree), str(out), fps=3, size=32, workers=1, progress=False)
    assert {os.path.basename(r.src): r.status for r in third}["a.mp4"] == "done"
    assert len(decord.VideoReader(str(out / "a.mp4"))) == 6


def test_compress_cli_exit_status(raw_tree, tmp_path, capsys):
    assert compress_main(["--input_root", str(raw_tree), "--output_root", str(tmp_path / "o"), "--size", "32",
                          "--workers", "1"]) == 1
    assert "1 failed" in capsys.readouterr().err
    os.remove(raw_tree / "sub" / "broken.avi")
    assert compress_main(["--input_root", str(raw_tree), "--output_root", str(tmp_path / "o"), "--size", "32",
                          "--workers", "1"]) == 0
    assert [os.path.basename(j.dst) for j in list_jobs(str(raw_tree), str(tmp_path))] == ["a.mp4", "b.mp4"]


def test_synthetic_cli(tmp_path, capsys):
    assert synthetic_main([str(tmp_path / "syn"), "--num_train", "3", "--num_test", "2", "--size", "32",
                           "--seed", "1"]) == 0
    assert "features_path:" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "syn" / "videos")) == [f"video{i}.mp4" for i in range(5)]
    lines = (tmp_path / "syn" / "MSRVTT_train.9k.csv").read_text().splitlines()
    assert lines == ["video_id", "video0", "video1", "video2"]
    reader = decord.VideoReader(str(tmp_path / "syn" / "videos" / "video0.mp4"))
    assert reader.get_avg_fps() == pytest.approx(3.0) and 12 <= len(reader) <= 18


def test_keyint_puts_keyframes_where_asked(tmp_path):
    from preprocess.compress_video import is_valid_output, max_keyframe_gap

    frames = np.random.default_rng(1).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    every3 = write_video(str(tmp_path / "k3.mp4"), frames, fps=3, keyint=3)
    default = write_video(str(tmp_path / "k0.mp4"), frames, fps=3)
    assert list(decord.VideoReader(every3).get_key_indices()) == [0, 3, 6, 9]
    assert list(decord.VideoReader(default).get_key_indices()) == [0]
    assert max_keyframe_gap([0, 3, 6, 9], 10) == 3 and max_keyframe_gap([0], 10) == 10
    assert max_keyframe_gap([0, 4], 6) == 4 and max_keyframe_gap([], 5) == 5
    assert is_valid_output(every3, 32, keyint=3) and is_valid_output(default, 32)
    assert not is_valid_output(default, 32, keyint=3)  # keyframes too far apart: re-encode
    with pytest.raises(ValueError):
        write_video(str(tmp_path / "bad.mp4"), frames, keyint=-1)


def test_compress_tree_keyint(raw_tree, tmp_path):
    out = tmp_path / "out"
    compress_tree(str(raw_tree), str(out), fps=3, size=32, workers=1, progress=False, keyint=None)
    assert list(decord.VideoReader(str(out / "a.mp4")).get_key_indices()) == [0]  # x264 default GOP
    mtime = os.path.getmtime(out / "a.mp4")
    # asking for a keyframe every 2 frames re-encodes the outputs that do not have them
    assert compress_main(["--input_root", str(raw_tree), "--output_root", str(out), "--size", "32",
                          "--workers", "1", "--keyint", "2"]) == 1  # broken.avi still fails
    a = decord.VideoReader(str(out / "a.mp4"))
    assert list(a.get_key_indices()) == [0, 2, 4] and len(a) == 6 and os.path.getmtime(out / "a.mp4") != mtime
    assert list(decord.VideoReader(str(out / "sub" / "b.mp4")).get_key_indices()) == [0, 2, 4]
    again = compress_tree(str(raw_tree), str(out), fps=3, size=32, workers=1, progress=False, keyint=2)
    assert sorted(r.status for r in again) == ["failed", "skipped", "skipped"]


def test_synthetic_keyint(tmp_path):
    assert synthetic_main([str(tmp_path / "syn"), "--num_train", "1", "--num_test", "0", "--size", "32",
                           "--min_frames", "12", "--max_frames", "12", "--keyint", "4"]) == 0
    reader = decord.VideoReader(str(tmp_path / "syn" / "videos" / "video0.mp4"))
    assert list(reader.get_key_indices()) == [0, 4, 8]


@pytest.mark.parametrize("width,height", [(40, 64), (90, 50)])
def test_published_scaling_reproduces_the_published_command(tmp_path, width, height):
    """--published_scaling gives the frames the published ffmpeg command gives (portrait: width 224 and a
    squashed height trunc(224 * a / 2) * 2); the default keeps the aspect ratio."""
    import subprocess

    from preprocess.compress_video import published_output_size
    from preprocess.ffmpeg_tools import find_ffmpeg

    raw = tmp_path / "raw"
    rng = np.random.default_rng(1)
    write_video(str(raw / "v.mp4"), rng.integers(0, 255, (20, height, width, 3), dtype=np.uint8), fps=10)
    published = tmp_path / "published.mp4"
    cmd = [find_ffmpeg(), "-y", "-loglevel", "error", "-i", str(raw / "v.mp4"), "-filter:v",
           "scale='if(gt(a,1),trunc(oh*a/2)*2,224)':'if(gt(a,1),224,trunc(ow*a/2)*2)'", "-map", "0:v", "-r", "3",
           str(published)]
    subprocess.run(cmd, check=True, capture_output=True)
    ours = compress_tree(str(raw), str(tmp_path / "ours"), fps=3, size=224, workers=1, progress=False,
                         published_scaling=True)
    assert [r.status for r in ours] == ["done"]
    want = decord.VideoReader(str(published))
    got = decord.VideoReader(str(tmp_path / "ours" / "v.mp4"))
    assert len(got) == len(want) and got[0].shape == want[0].shape
    assert (got[0].shape[1], got[0].shape[0]) == published_output_size(width, height, 224)
    np.testing.assert_array_equal(got.get_batch(list(range(len(got)))).asnumpy(),
                                  want.get_batch(list(range(len(want)))).asnumpy())
    default = compress_tree(str(raw), str(tmp_path / "default"), fps=3, size=224, workers=1, progress=False)
    assert [r.status for r in default] == ["done"]
    h, w = decord.VideoReader(str(tmp_path / "default" / "v.mp4"))[0].shape[:2]
    assert min(h, w) == 224 and abs(max(h, w) / 224 - max(width, height) / min(width, height)) < 0.02
    if height > width:
        assert got[0].shape[:2] == (140, 224)  # 224 * 40 / 64 = 140: squashed (the aspect would need 358)


def test_synthetic_dataset_write_failures_are_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert synthetic_main([str(blocker / "syn"), "--num_train", "1", "--num_test", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"make_synthetic_dataset: error: cannot write the dataset to {blocker / 'syn'}: Not a directory\n"
    # a failing annotation write (runtime.files) is one line naming the file
    from runtime import files

    def no_space(path, write_fn, mode="wb"):
        raise files.OutputWriteError(f"no space left on device while writing {path}")

    monkeypatch.setattr(files, "atomic_write", no_space)
    assert synthetic_main([str(tmp_path / "syn"), "--num_train", "1", "--num_test", "1", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err == ("make_synthetic_dataset: error: no space left on device while writing "
                   f"{tmp_path / 'syn' / 'MSRVTT_train.9k.csv'}\n"), err


def test_umask_is_read_without_changing_it(tmp_path):
    from runtime.files import current_umask, give_new_file_mode

    before = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
        f = tmp_path / "f"
        f.write_text("")
        os.chmod(f, 0o600)
        give_new_file_mode(str(f))
        assert oct(os.stat(f).st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(before)
