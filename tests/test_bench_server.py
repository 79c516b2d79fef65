"""benchmarks/bench_server.py's indexing part times decoding the ranges the index encodes: its plan is the
index's own."""
import numpy as np

from retrieval.index import VideoIndex
from retrieval.segments import Segmentation


def test_the_indexing_benchmark_plans_the_ranges_the_index_encodes(loaded, tmp_path):
    from benchmarks.bench_server import INDEX_RANGES, index_ranges
    from preprocess.ffmpeg_tools import write_video

    # 20 frames at 3 fps: 6.67 s, not whole seconds, where frame and whole-second boundaries part
    frames = np.random.default_rng(0).integers(0, 255, size=(20, 32, 32, 3), dtype=np.uint8)
    video = write_video(str(tmp_path / "videos" / "clip.mp4"), frames, fps=3.0)
    seg = Segmentation(mode="windows", window=2, stride=1)
    index = VideoIndex.build(loaded.model, [video], index_dir=str(tmp_path / "idx"), tokenizer=loaded.tokenizer,
                             batch_size=4, precision="fp32", log=None, segmentation=seg, ranges=INDEX_RANGES)
    planned = index_ranges(video, seg)
    assert len(planned) > 1
    assert [(e["start"], e["end"]) for e in index.entries] == planned
