"""Pictures of results: a contact sheet of top-k thumbnails and a support-set attention heatmap."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ssbctl.core.io import write_user_file

CELL = 96  # thumbnail box of the contact sheet
LABEL = 14  # text line height
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def sheet_size(queries: int, k: int) -> tuple[int, int]:
    """Pixel size of a contact sheet: one row per query, one column per result."""
    return k * (CELL + 4) + 4, queries * (CELL + 3 * LABEL + 4) + 4


def contact_sheet(rows: list[tuple[str, list[dict[str, Any]], list[Path | None]]], k: int,
                  out: Path) -> tuple[int, int]:
    """Write a PNG: for each (query, hits, thumbnails) a title line and the top-k thumbnails
    labelled with rank and score. Returns the image size."""
    from PIL import Image, ImageDraw

    size = sheet_size(len(rows), k)
    sheet = Image.new("RGB", size, (24, 24, 28))
    draw, font = ImageDraw.Draw(sheet), _font()
    for r, (query, hits, thumbs) in enumerate(rows):
        top = 4 + r * (CELL + 3 * LABEL + 4)
        draw.text((4, top), query[:k * 16], fill=(235, 235, 235), font=font)
        for c, (hit, thumb) in enumerate(zip(hits[:k], thumbs)):
            left = 4 + c * (CELL + 4)
            box = (left, top + LABEL, left + CELL, top + LABEL + CELL)
            if thumb is not None:
                with Image.open(thumb) as png:
                    img = png.convert("RGB")
                img.thumbnail((CELL, CELL))
                sheet.paste(img, (left + (CELL - img.width) // 2, top + LABEL + (CELL - img.height) // 2))
            else:
                draw.rectangle(box, fill=(70, 70, 70))
            draw.text((left, top + LABEL + CELL + 1), f"#{hit['rank']}  {hit['score']:.3f}",
                      fill=(250, 220, 120), font=font)
            draw.text((left, top + 2 * LABEL + CELL), str(hit["video_id"])[-16:], fill=(180, 180, 180), font=font)
    _save_png(sheet, out)
    return size


def _save_png(image: Any, out: Path) -> None:
    """Write ``image`` as a PNG at ``out`` atomically; an unwritable ``out`` is a UserError naming it."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    write_user_file(out, data.getvalue())


def _colour(value: float) -> tuple[int, int, int]:
    """Viridis-like colour of a value in [0, 1]."""
    value = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(value), len(VIRIDIS) - 2)
    t = value - i
    return tuple(int(a + (b - a) * t) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))  # type: ignore[return-value]


def heatmap_size(n: int, cell: int = 40, margin: int = 110) -> tuple[int, int]:
    """Pixel size of an n x n attention heatmap."""
    return margin + n * cell + 10, margin + n * cell + 10 + LABEL


def heatmap(weights: list[list[float]], labels: list[str], title: str, out: Path, cell: int = 40,
            margin: int = 110) -> tuple[int, int]:
    """Write the support-set attention (rows attend over columns) as a PNG, like the paper's figure."""
    from PIL import Image, ImageDraw

    n = len(weights)
    size = heatmap_size(n, cell, margin)
    image = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(image), _font()
    draw.text((4, 2), title[:90], fill=(0, 0, 0), font=font)
    peak = max((w for row in weights for w in row), default=1.0) or 1.0
    for i, row in enumerate(weights):
        draw.text((4, margin + i * cell + cell // 3), labels[i][-16:], fill=(0, 0, 0), font=font)
        draw.text((margin + i * cell + 2, margin - LABEL * (1 + i % 2)), labels[i][-6:], fill=(0, 0, 0), font=font)
        for j, w in enumerate(row):
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_colour(w / peak))
            draw.text((x + 4, y + cell // 3), f"{w:.2f}", fill=(255, 255, 255) if w < 0.6 * peak else (0, 0, 0),
                      font=font)
    _save_png(image, out)
    return size
