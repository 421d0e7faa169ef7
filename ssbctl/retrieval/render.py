"""Pictures of results: a contact sheet (a strip of frames over time per result) and the
support-set attention heatmap (matplotlib, Agg backend: no display needed, no pyplot state)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssbctl.core.io import write_user_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CELL = 112  # the box one frame of a strip is fitted into
FRAMES = 5  # frames per result: evenly spread over the video, left to right in time
GAP = 4  # between frames and between results
PAD = 8  # around the sheet and below each query's block
LINE = 18  # one text line
BACKGROUND, TITLE, SCORE, MISSING = (24, 24, 28), (240, 240, 240), (250, 220, 120), (70, 70, 70)
DPI = 100  # heatmap resolution: 9-point tick labels are 12-13 pixels high
LABEL_CHARS = 36  # heatmap tick labels longer than this are shortened in the middle


def _font(size: int = 13) -> Any:
    """PIL's bundled scalable font (Pillow >= 10.1); the old fixed bitmap font before that."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size
        return ImageFont.load_default()


def sheet_size(queries: int, k: int, frames: int = FRAMES) -> tuple[int, int]:
    """Pixel size of a contact sheet: per query a title line, then per result a label line over a
    strip of ``frames`` frames."""
    width = 2 * PAD + frames * (CELL + GAP) - GAP
    block = LINE + k * (LINE + CELL + GAP) + PAD
    return width, PAD + queries * block


def result_frames(path: str, thumb: Path | None, frames: int = FRAMES) -> list[np.ndarray]:
    """Frames of one result for its strip: ``frames`` frames spread evenly over the video file when it
    can still be read, else the index's single thumbnail, else none. uint8 ``(H, W, 3)`` each."""
    from ssbctl.data.video import DecodeError, Sampling, read_frames

    if path and Path(path).is_file():
        try:
            return list(read_frames(Path(path), Sampling(num_frames=frames)))
        except DecodeError:
            pass
    if thumb is not None:
        from PIL import Image

        with Image.open(thumb) as png:
            return [np.asarray(png.convert("RGB"))]
    return []


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut at the end (with ``...``) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def hit_label(hit: dict[str, Any]) -> str:
    """One line naming a result: rank, score, id, split and caption (those the hit has)."""
    parts = [f"#{hit['rank']}", f"{hit['score']:.3f}" if isinstance(hit.get("score"), float) else "-",
             str(hit["video_id"])]
    if hit.get("split"):
        parts.append(f"[{hit['split']}]")
    if hit.get("caption"):
        parts.append(f"- {hit['caption']}")
    return "  ".join(parts)


def contact_sheet(rows: list[tuple[str, list[dict[str, Any]], list[list[np.ndarray]]]], k: int, out: Path,
                  frames: int = FRAMES) -> tuple[int, int]:
    """Write a PNG: for each (query, hits, strips) a title line, then per result a label line
    (rank, score, id, split, caption) over its strip of frames, earliest left. Returns the size."""
    from PIL import Image, ImageDraw

    size = sheet_size(len(rows), k, frames)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(sheet), _font()
    inner = size[0] - 2 * PAD
    top = PAD
    for query, hits, strips in rows:
        draw.text((PAD, top), _fit(draw, f"query: {query}", font, inner), fill=TITLE, font=font)
        y = top + LINE
        for hit, strip in zip(hits[:k], strips):
            draw.text((PAD, y), _fit(draw, hit_label(hit), font, inner), fill=SCORE, font=font)
            for f in range(frames):
                left = PAD + f * (CELL + GAP)
                if f < len(strip):
                    img = _fit_frame(strip[f])
                    sheet.paste(img, (left + (CELL - img.width) // 2, y + LINE + (CELL - img.height) // 2))
                elif not strip:
                    draw.rectangle((left, y + LINE, left + CELL - 1, y + LINE + CELL - 1), fill=MISSING)
            y += LINE + CELL + GAP
        top += LINE + k * (LINE + CELL + GAP) + PAD
    _save_png(sheet, out)
    return size


def _fit_frame(frame: np.ndarray) -> Any:
    """A frame as a PIL image fitting the ``CELL`` box: shrunk smoothly when larger, enlarged by a
    whole factor with crisp pixels when it is at most half the box (a 32-pixel clip stays visible)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame))
    scale = CELL // max(img.size)
    if scale >= 2:
        nearest = getattr(Image, "Resampling", Image).NEAREST  # Image.Resampling: Pillow >= 9.1
        return img.resize((img.width * scale, img.height * scale), nearest)
    img.thumbnail((CELL, CELL))
    return img


def _save_png(image: Any, out: Path) -> None:
    """Write ``image`` as a PNG at ``out`` atomically; an unwritable ``out`` is a UserError naming it."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    write_user_file(out, data.getvalue())


def shorten_middle(text: str, width: int = LABEL_CHARS) -> str:
    """``text`` if it fits ``width`` characters, else its start and end around an ellipsis: video
    ids and paths differ at both ends (a dataset prefix, a clip number)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def heatmap_inches(n: int) -> tuple[float, float]:
    """Figure size in inches of an ``n`` x ``n`` heatmap: cells stay readable as k grows."""
    side = max(5.0, 0.55 * n + 3.0)
    return side + 2.5, side + 1.0


def heatmap_size(n: int) -> tuple[int, int]:
    """Pixel size of the PNG of an ``n`` x ``n`` heatmap."""
    width, height = heatmap_inches(n)
    return round(width * DPI), round(height * DPI)


def heatmap_figure(weights: list[list[float]], labels: list[str], title: str) -> Figure:
    """The support-set attention as a matplotlib figure: row ``i`` (a result, by retrieval rank) is
    how much caption reconstruction for it draws on each column (another result), as in the
    paper's figure; a colour bar gives the scale and each cell its weight when there is room."""
    from matplotlib.figure import Figure

    n = len(weights)
    fig = Figure(figsize=heatmap_inches(n), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    grid = np.asarray(weights, dtype=np.float64).reshape(n, n)
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(float(grid.max(initial=0.0)), 1e-12))
    ticks = [f"#{i + 1} {shorten_middle(str(label))}" for i, label in enumerate(labels)]
    ax.set_xticks(range(n), ticks, rotation=40, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(n), ticks, fontsize=9)
    ax.set_xlabel("attended to: the support video it draws on", fontsize=10)
    ax.set_ylabel("attending: result whose caption is reconstructed (by rank)", fontsize=10)
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=11)
    if n <= 12:
        peak = float(grid.max(initial=0.0))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > 0.6 * peak else "white")
    fig.colorbar(image, ax=ax, label="attention weight (each row sums to 1)", shrink=0.8)
    return fig


def heatmap(weights: list[list[float]], labels: list[str], title: str, out: Path) -> tuple[int, int]:
    """Write the support-set attention heatmap (see :func:`heatmap_figure`) as a PNG; its pixel size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = heatmap_figure(weights, labels, title)
    canvas = FigureCanvasAgg(fig)
    data = io.BytesIO()
    canvas.print_png(data)
    write_user_file(out, data.getvalue())
    width, height = canvas.get_width_height()
    return int(width), int(height)
