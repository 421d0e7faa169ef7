"""What a run's video features were made from, and telling when new videos obviously differ.

A run records, per expert, the backbone, the dataset it was trained on and the typical frame size
of that dataset's videos (``RUN/experts.json``). ``ssbctl index`` compares new videos with it: a
model trained on 32x32-pixel features of small synthetic clips returns noise on real footage, and
says nothing of it unless warned.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PROBED = 8  # files opened to tell a folder's typical frame size
PIXELS_FACTOR = 2.0  # pixels backbone: frames this many times wider or taller than in training differ
LEARNED_FACTOR = 8.0  # learned backbones resize frames themselves: only a much larger factor is "far"
FITTING_RECIPE = "msvd"  # a shipped recipe of real footage with a learned backbone (prepare msvd downloads it)


def frame_size(path: Path) -> tuple[int, int] | None:
    """Width and height of a video file's first video stream (from its header), or None if unreadable."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    except Exception:  # noqa: BLE001 - any unreadable file simply gives no size
        return None
    return (width, height) if width > 0 and height > 0 else None


def typical_frame_size(paths: list[Path], probed: int = PROBED) -> list[int] | None:
    """The median width and height of the first ``probed`` readable files of ``paths``, or None."""
    sizes = []
    for path in paths[: probed * 8]:  # a store whose videos are elsewhere is not stat-ed whole
        size = frame_size(path) if path.is_file() else None
        if size is not None:
            sizes.append(size)
            if len(sizes) == probed:
                break
    if not sizes:
        return None
    return [int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes))]


def _factor(a: list[int], b: list[int]) -> float:
    """How many times wider or taller one frame size is than the other (>= 1)."""
    return max(max(x, y) / max(min(x, y), 1) for x, y in zip(a, b))


def footage_warnings(experts: list[dict[str, Any]], videos: list[Path]) -> list[str]:
    """Warnings (one line each) when ``videos`` obviously differ from what the run's ``experts`` were
    trained on: the pixels backbone on footage of another frame size, or any backbone on frames many
    times larger or smaller than in training; each points to what fits."""
    size = typical_frame_size(videos)
    warnings = []
    for spec in experts:
        trained = spec.get("frame_size")
        if size is None or not isinstance(trained, list) or len(trained) != 2:
            continue
        backbone = spec.get("backbone", {})
        dataset = spec.get("dataset") or "its training data"
        factor = _factor(size, trained)
        seen = f"these videos are {size[0]}x{size[1]}, the run's {dataset} videos {trained[0]}x{trained[1]}"
        if backbone.get("name") == "pixels" and factor > PIXELS_FACTOR:
            pixels = backbone.get("size", "?")
            warnings.append(f"this run's video features are {pixels}x{pixels} pixels of {dataset} clips and "
                            f"{seen}: on such footage its results are noise. For real videos train a recipe with a "
                            f"learned backbone: ssbctl prepare {FITTING_RECIPE} && ssbctl train --recipe "
                            f"{FITTING_RECIPE}")
        elif backbone.get("name") != "pixels" and factor > LEARNED_FACTOR:
            warnings.append(f"{seen} (frame size far from training): expect weaker results; a run trained on "
                            f"footage like this fits better")
    return warnings
