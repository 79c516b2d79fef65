"""``search_videos.py index --compile auto``: whether compiling the video encoder pays for this run.

Compiling costs a fixed time per process (runtime.compilation: minutes from an empty compile cache,
seconds from a warm one) and saves a fixed share of every batch, so it pays from a number of ranges on
(runtime.compilation.INDEX_AUTO_MIN_RANGES, measured). The index run decides once it has planned its ranges
(retrieval.index.VideoIndex.build), so the count is exact and nothing is listed or probed twice: the
ranges it still has to encode (a resumed run: those no shard holds yet); a run split between processes
counts the largest process's share, and process 0 decides for every process, so that they all compile or
none does.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


def index_shape_key(model, device, batch_size: int, dtype) -> str:
    """The compile cache key of the index's video encoder at this batch shape (runtime.compilation)."""
    from runtime.compilation import shape_key

    return shape_key(use="index video encoder", clip=dataclasses.asdict(model.clip.config),
                     dgl=dataclasses.asdict(model.config), batch=batch_size, dtype=str(dtype), device=device.type)


def recorded_line(compiled: bool) -> str:
    """The log line of ``--compile auto`` into an index that records its choice."""
    return (f"--compile auto: {'compiling the video encoder' if compiled else 'eager'} (as the index records: its "
            f"entries were computed {'compiled' if compiled else 'eagerly'})")


@dataclasses.dataclass
class AutoCompile:
    """``--compile auto`` left to the index run (VideoIndex.build's ``compile_auto``): ``decide`` on process 0
    once the run's ranges are planned, ``compile`` on every process when it says yes."""

    warm: bool                                # the compile cache holds this run's shape (runtime.compilation)
    compile: Callable[[], None]               # compiles the model's video encoder in place
    log: Callable[[str], None] | None = None  # where the one line goes

    def decide(self, ranges: int, processes: int = 1) -> bool:
        """Compile for a run whose largest share is ``ranges`` ranges? Says which in one line."""
        from runtime.compilation import auto_compile_index

        wanted, line = auto_compile_index(ranges, self.warm, processes)
        if self.log:
            self.log(line)
        return wanted

    def follow(self, compiled: bool) -> bool:
        """The index records a choice (another run created it while this one waited): keep it."""
        if self.log:
            self.log(recorded_line(compiled))
        return compiled
