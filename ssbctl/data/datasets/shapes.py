"""``shapes``: a synthetic video-text dataset generated deterministically from a seed.

Each clip shows one or two objects (shape, colour, size) that move left/right/up/down, grow,
shrink, spin or stay still; with two objects one "moves towards" or "follows" the other. Each
video gets several captions drawn from paraphrase templates and synonyms, and many videos share
meaning with others, which is what makes contrastive learning's false negatives visible.
The videos are real H.264 mp4 files written with PyAV; the annotations are written in the
``custom`` dataset's format (``captions.jsonl`` rows of video, caption, split).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssbctl.core.io import atomic_write_json, atomic_write_text, jsonl_text

COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((225, 35, 35), ["red", "crimson"]),
    "green": ((40, 200, 60), ["green"]),
    "blue": ((45, 80, 235), ["blue"]),
    "yellow": ((240, 220, 40), ["yellow", "golden"]),
    "purple": ((165, 55, 205), ["purple", "violet"]),
    "white": ((245, 245, 245), ["white"]),
}
SHAPES: dict[str, list[str]] = {
    "circle": ["circle", "ball", "disc", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"],
    "cross": ["cross", "plus sign"],
}
SIZES: dict[str, tuple[float, list[str]]] = {
    "small": (6.0, ["small", "little", "tiny"]),
    "large": (11.0, ["large", "big"]),
}
MOTIONS: dict[str, list[str]] = {
    "left": ["moves to the left", "slides left", "goes left", "travels leftwards"],
    "right": ["moves to the right", "slides right", "goes right", "travels rightwards"],
    "up": ["moves up", "rises", "goes upwards", "floats up"],
    "down": ["moves down", "falls", "goes downwards", "sinks"],
    "grows": ["grows", "gets bigger", "expands", "grows larger"],
    "shrinks": ["shrinks", "gets smaller", "contracts", "becomes smaller"],
    "spins": ["spins", "rotates", "turns around", "is spinning"],
    "still": ["stays still", "does not move", "sits still", "rests in place"],
}
RELATIONS: dict[str, list[str]] = {
    "towards": ["moves towards", "approaches", "goes towards", "heads to"],
    "follows": ["follows", "chases", "trails behind", "goes after"],
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"dark": (30, 30, 38), "grey": (105, 105, 110), "brown": (95, 70, 50), "teal": (30, 85, 90)}


@dataclass(frozen=True)
class ShapesSpec:
    """How many clips, of what size, and how they are split. Same spec and seed, same data."""

    num_videos: int = 1000
    seed: int = 0
    frame_size: int = 64
    fps: int = 8
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    captions_per_video: int = 4
    two_object_fraction: float = 0.25
    val_fraction: float = 0.1
    test_fraction: float = 0.2


# ------------------------------------------------------------------ scene sampling


def _sample_object(rng: np.random.Generator, motion: str | None = None) -> dict[str, Any]:
    motion = motion or str(rng.choice(list(MOTIONS)))
    shapes = [s for s in SHAPES if not (motion == "spins" and s == "circle")]
    return {"shape": str(rng.choice(shapes)), "colour": str(rng.choice(list(COLOURS))),
            "size": str(rng.choice(list(SIZES))), "motion": motion}


def sample_scene(rng: np.random.Generator, spec: ShapesSpec) -> dict[str, Any]:
    """The attributes of one clip (objects, background, length); no pixels yet."""
    seconds = float(rng.uniform(spec.min_seconds, spec.max_seconds))
    scene: dict[str, Any] = {"background": str(rng.choice(list(BACKGROUNDS))),
                             "frames": max(4, int(round(seconds * spec.fps))),
                             "gradient": float(rng.uniform(-0.5, 0.5)), "relation": None}
    if rng.random() < spec.two_object_fraction:
        direction = str(rng.choice(list(DIRECTIONS)))
        a, b = _sample_object(rng, direction), _sample_object(rng, "still")
        while b["colour"] == a["colour"]:
            b["colour"] = str(rng.choice(list(COLOURS)))
        scene["relation"] = str(rng.choice(list(RELATIONS)))
        if scene["relation"] == "follows":
            b["motion"] = direction
        scene["objects"] = [a, b]
    else:
        scene["objects"] = [_sample_object(rng)]
    return scene


# ------------------------------------------------------------------ captions


def _noun_phrase(rng: np.random.Generator, obj: dict[str, Any]) -> str:
    words = []
    if rng.random() < 0.6:
        words.append(str(rng.choice(SIZES[obj["size"]][1])))
    if rng.random() < 0.9:
        words.append(str(rng.choice(COLOURS[obj["colour"]][1])))
    words.append(str(rng.choice(SHAPES[obj["shape"]])))
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def caption(rng: np.random.Generator, scene: dict[str, Any]) -> str:
    """One paraphrase of what happens in ``scene``."""
    objs = scene["objects"]
    subject = _noun_phrase(rng, objs[0])
    if scene["relation"]:
        verb = str(rng.choice(RELATIONS[scene["relation"]]))
        text = f"{subject} {verb} {_noun_phrase(rng, objs[1]).replace('a ', 'the ', 1)}"
    else:
        text = f"{subject} {rng.choice(MOTIONS[objs[0]['motion']])}"
    roll = rng.random()
    if roll < 0.2:
        text = f"{text} on a {scene['background']} background"
    elif roll < 0.35:
        text = f"a video of {text}"
    return text


def captions(rng: np.random.Generator, scene: dict[str, Any], count: int) -> list[str]:
    """``count`` distinct paraphrases (fewer if the templates run out)."""
    out: list[str] = []
    for _ in range(count * 10):
        text = caption(rng, scene)
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


# ------------------------------------------------------------------ rendering


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if kind == "triangle":
        return (v <= 0.6 * r) & (v >= -r + 1.7 * np.abs(u))
    return ((np.abs(u) <= r) & (np.abs(v) <= r / 3)) | ((np.abs(u) <= r / 3) & (np.abs(v) <= r))


def _trajectory(obj: dict[str, Any], start: tuple[float, float], t: float,
                size: int) -> tuple[float, float, float, float]:
    """Centre x, centre y, radius, angle of ``obj`` at time ``t`` in [0, 1]."""
    radius = SIZES[obj["size"]][0] * size / 64
    x, y = start
    travel = 0.45 * size
    if obj["motion"] in DIRECTIONS:
        dx, dy = DIRECTIONS[obj["motion"]]
        x, y = x + dx * travel * (t - 0.5), y + dy * travel * (t - 0.5)
    if obj["motion"] == "grows":
        radius *= 0.5 + t
    elif obj["motion"] == "shrinks":
        radius *= 1.5 - t
    angle = 2 * np.pi * t if obj["motion"] == "spins" else 0.0
    return x, y, radius, angle


def _starts(rng: np.random.Generator, scene: dict[str, Any], size: int) -> list[tuple[float, float]]:
    jitter = lambda: float(rng.uniform(-0.1, 0.1) * size)  # noqa: E731
    centre = (size / 2 + jitter(), size / 2 + jitter())
    if not scene["relation"]:
        return [centre]
    dx, dy = DIRECTIONS[scene["objects"][0]["motion"]]
    gap = 0.3 * size
    if scene["relation"] == "towards":
        return [(size / 2 - dx * gap, size / 2 - dy * gap), (size / 2 + dx * gap, size / 2 + dy * gap)]
    lead = 0.2 * size  # the follower keeps this far behind, so the two never overlap
    return [(size / 2 - dx * lead, size / 2 - dy * lead), (size / 2 + dx * lead, size / 2 + dy * lead)]


def render(rng: np.random.Generator, scene: dict[str, Any], size: int) -> np.ndarray:
    """The clip as uint8 frames ``(T, size, size, 3)``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    base = np.array(BACKGROUNDS[scene["background"]], np.float32)
    shade = 1.0 + scene["gradient"] * (xs + ys - size) / size
    background = np.clip(base[None, None] * shade[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255)
    starts = _starts(rng, scene, size)
    frames = np.empty((scene["frames"], size, size, 3), np.uint8)
    for f in range(scene["frames"]):
        t = f / max(1, scene["frames"] - 1)
        img = background.copy()
        for obj, start in zip(scene["objects"], starts):
            if scene["relation"] == "towards" and obj is scene["objects"][0]:
                t_obj = 0.5 + 0.5 * t  # the mover covers only half the gap: it approaches, never overlaps
            else:
                t_obj = t
            x, y, r, a = _trajectory(obj, start, t_obj, size)
            u = (xs - x) * np.cos(a) + (ys - y) * np.sin(a)
            v = -(xs - x) * np.sin(a) + (ys - y) * np.cos(a)
            img[_shape_mask(obj["shape"], u, v, r)] = COLOURS[obj["colour"]][0]
        frames[f] = img.astype(np.uint8)
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode frames as an H.264 mp4 with PyAV (written to a temp name, then renamed)."""
    import av

    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Same seed, same bytes: x264's macroblock-tree rate control gave different frames from run to
        # run on a loaded machine (about 1 clip in 10, even with one thread); without it, none did.
        stream.options = {"crf": "18", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def assign_splits(spec: ShapesSpec) -> list[str]:
    """The split of every video index, from a seeded permutation (by video, never by caption)."""
    order = np.random.default_rng(spec.seed + 1).permutation(spec.num_videos)
    n_test = int(round(spec.num_videos * spec.test_fraction))
    n_val = int(round(spec.num_videos * spec.val_fraction))
    splits = ["train"] * spec.num_videos
    for rank, index in enumerate(order):
        splits[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def generate(root: Path, spec: ShapesSpec, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the clips and ``captions.jsonl`` under ``root``; skip if the same spec is there."""
    root = Path(root)
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == asdict(spec):
        return root / "captions.jsonl"
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    meta: list[dict[str, object]] = []
    splits = assign_splits(spec)
    for i in range(spec.num_videos):
        rng = np.random.default_rng([spec.seed, i])
        scene = sample_scene(rng, spec)
        rel = f"videos/shapes_{i:05d}.mp4"
        write_mp4(root / rel, render(rng, scene, spec.frame_size), spec.fps)
        rows.extend({"video": rel, "caption": c, "split": splits[i]}
                    for c in captions(rng, scene, spec.captions_per_video))
        meta.append({"video": rel, **scene})
        if progress:
            progress(i + 1, spec.num_videos)
    atomic_write_text(root / "captions.jsonl", jsonl_text(rows))
    atomic_write_text(root / "scenes.jsonl", jsonl_text(meta))
    atomic_write_json(spec_file, asdict(spec))
    return root / "captions.jsonl"
