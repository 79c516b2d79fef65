"""A self-contained HTML results page: per query, the top-k videos (or time ranges) with their score,
a strip of the frames the model saw (embedded as images) and a player that starts at the range."""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from retrieval.encode import frames_as_seen, read_for_model

STRIP_HEIGHT = 96  # px per frame in the strip

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
header { margin-bottom: 16px; color: #555; font-size: 14px; }
h2 { font-size: 18px; margin: 24px 0 8px; }
ol.results { list-style: none; padding: 0; margin: 0; }
li.result { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.meta { display: flex; gap: 16px; align-items: baseline; margin-bottom: 6px; font-size: 14px; }
.rank { font-weight: bold; width: 2.5em; }
.score { font-family: monospace; }
.strip { display: block; image-rendering: pixelated; max-width: 100%; }
.missing { color: #a00; font-size: 13px; }
.range { font-family: monospace; font-weight: bold; }
.body { display: flex; gap: 12px; align-items: flex-start; }
video { width: 320px; background: #000; }
"""


def strip_image(path: str, max_frames: int, size: int, start=None, end=None, resize_short_side: bool = False,
                decoder: str = "decord", ranges: str = "seconds"):
    """The frames the model saw of ``path`` (its range ``start``..``end``), side by side, STRIP_HEIGHT px
    high (PIL image); None when the file cannot be read."""
    from PIL import Image

    try:
        video, mask, _ = read_for_model(path, max_frames, size, start, end, resize_short_side, decoder, ranges)
    except Exception:  # noqa: BLE001 - the page says the frames are unavailable
        return None
    frames = frames_as_seen(video[: int(mask.sum())]).numpy()      # (T, S, S, 3)
    strip = Image.fromarray(frames.transpose(1, 0, 2, 3).reshape(size, -1, 3))
    scale = STRIP_HEIGHT / size
    return strip.resize((round(strip.width * scale), STRIP_HEIGHT), Image.NEAREST if scale >= 1 else Image.BILINEAR)


def frame_strip(path: str, max_frames: int, size: int, start=None, end=None, resize_short_side: bool = False,
                decoder: str = "decord", ranges: str = "seconds") -> str | None:
    """:func:`strip_image` as a data URI; None when the file cannot be read."""
    strip = strip_image(path, max_frames, size, start, end, resize_short_side, decoder, ranges)
    if strip is None:
        return None
    buf = io.BytesIO()
    kind = "png" if STRIP_HEIGHT >= size else "jpeg"  # sharp pixels for tiny frames, small files for real ones
    strip.save(buf, format=kind.upper(), **({} if kind == "png" else {"quality": 85}))
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode()


def _strip_html(path: str, max_frames: int, size: int, start=None, end=None, transform: dict | None = None) -> str:
    transform = transform or {}
    uri = frame_strip(path, max_frames, size, start, end, transform.get("resize_short_side", False),
                      transform.get("decoder", "decord"), transform.get("ranges", "seconds"))
    if uri is None:
        return '<div class="missing">frames unavailable (the file cannot be read now)</div>'
    return f'<img class="strip" src="{uri}" alt="the frames the model saw">'


def _result_html(hit, max_frames: int, size: int, transform: dict) -> str:
    from retrieval.segments import format_range

    d = hit.entry.get("duration")
    link = Path(hit.path).as_uri()
    shown = format_range(0, d) if hit.start is None else format_range(hit.start, hit.end, d)
    fragment = "" if hit.start is None else f"#t={hit.start},{hit.end}"
    state = getattr(hit, "file", "ok")
    if state == "ok":
        mark, strip = "", _strip_html(hit.path, max_frames, size, hit.start, hit.end, transform)
    else:  # what is at the path now is not what was indexed: its frames are not shown as the hit's
        word = "deleted" if state == "gone" else "changed"
        mark = f'<span class="missing">file {word} since indexed</span>'
        strip = f'<div class="missing">frames not shown: the file was {word} since it was indexed</div>'
    return (f'<li class="result"><div class="meta"><span class="rank">#{hit.rank}</span>'
            f'<span class="range">{shown}</span>'
            f'<span class="score">score {hit.score:.4f}</span>'
            f'<a href="{html.escape(link + fragment)}">{html.escape(hit.path)}</a>{mark}</div>'
            f'<div class="body"><video controls preload="metadata" src="{html.escape(link + fragment)}"></video>'
            f"{strip}</div></li>")


def write_results_page(out_path: str, results: list[dict], index) -> None:
    """``results``: [{"query": text, "hits": [Hit, ...], "query_video": path (optional)}, ...]."""
    from runtime.files import atomic_write

    sampling = index.transform
    max_frames, size = sampling.get("max_frames", 12), sampling.get("image_resolution", 224)
    model = index.record.get("model", {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Video search results</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<header>index {html.escape(str(index.root or '(in memory)'))}: {len(index)} entries; model "
             f"{html.escape(model.get('fingerprint', '')[:12])}, {html.escape(index.segmentation.describe())} "
             f"({html.escape(os.path.basename(model.get('checkpoint') or 'no checkpoint'))}); "
             f"scores are cosine similarities; the strips show the {max_frames} sampled frames as the model "
             f"saw them ({size}x{size} px)</header>"]
    for r in results:
        parts.append(f'<section class="query"><h2>{html.escape(r["query"])}</h2>')
        if r.get("query_video"):
            parts.append(_strip_html(r["query_video"], max_frames, size, transform=sampling))
        parts.append('<ol class="results">')
        parts += [_result_html(h, max_frames, size, sampling) for h in r["hits"]]
        parts.append("</ol></section>")
    parts.append("</body></html>\n")
    atomic_write(out_path, lambda f: f.write("\n".join(parts)), mode="w")
