"""A trained run at work: :func:`load_run` loads a run's model from a checkpoint; the
:class:`LoadedRun` embeds texts, stored features and video files. Video files take one path,
:class:`VideoEmbedder`: decode with each expert's sampling, run its backbone, encode."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssbctl.config import Recipe
from ssbctl.core.device import resolve_device
from ssbctl.core.errors import UserError
from ssbctl.data.backbone import Backbone
from ssbctl.data.backbones import build_backbone
from ssbctl.data.decode_pool import DecodePool
from ssbctl.data.video import Sampling, thumbnail_png
from ssbctl.engine.checkpoint import find_checkpoint, load_weights
from ssbctl.engine.run import build_run_model, read_expert_specs, read_run_recipe
from ssbctl.model.embed import embed_features, embed_texts, require_finite
from ssbctl.model.ssb import SSBModel

if TYPE_CHECKING:
    from ssbctl.inference.caption import CaptionResult, SupportVideos

Progress = Callable[[int, int], None]


@dataclass
class LoadedRun:
    """A trained model ready to embed videos and text."""

    run_dir: Path
    recipe: Recipe
    model: SSBModel
    tokenizer: Any
    checkpoint: Path
    device: torch.device

    @property
    def source(self) -> str:
        """The run and checkpoint, as messages name them."""
        return f"run {self.run_dir} [{self.checkpoint.name}]"

    def encode_features(self, features: list[list[torch.Tensor]]) -> torch.Tensor:
        """Normalised embeddings ``(N, D)`` of ``features[expert][video]`` (``(T, dim)`` each);
        a DataError when the weights give non-finite ones."""
        embedded = embed_features(self.model, features, self.device)
        require_finite(self.source, videos=embedded)
        return embedded

    def __repr__(self) -> str:
        return (f"LoadedRun(run_dir={str(self.run_dir)!r}, checkpoint={self.checkpoint.name!r}, "
                f"embed_dim={self.model.cfg.embed_dim}, device={str(self.device)!r})")

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings: one string gives one embedding ``(D,)``, a list of strings
        ``(N, D)`` (as sentence-transformers' ``encode`` does). A 1-D query can go straight to
        :meth:`Index.search <ssbctl.retrieval.index.Index.search>`."""
        if isinstance(texts, str):
            return embed_texts(self.model, self.tokenizer, [texts], self.device)[0]
        return embed_texts(self.model, self.tokenizer, list(texts), self.device)

    def encode_video(self, paths: str | Path | Sequence[str | Path]) -> torch.Tensor:
        """Normalised embeddings of video files, decoded and featurised as in training: one path
        (``str`` or ``Path``) gives ``(D,)``, a list of paths ``(N, D)``."""
        if isinstance(paths, (str, Path)):
            return self.encode_video([paths])[0]
        files = [Path(p).expanduser() for p in paths]
        embedder = VideoEmbedder(self, workers=0)
        feats = []
        for i, f, reason, _ in embedder.features(files):
            if f is None:
                raise UserError(f"cannot read video {files[i]}: {reason}")
            feats.append(f)
        return embedder.embed(feats)

    def caption(self, video_embeddings: torch.Tensor, support: SupportVideos | None = None, *,
                ids: Sequence[str | None] | None = None, paths: Sequence[str | Path | None] | None = None,
                beam: int = 1, top: int = 5) -> list[CaptionResult]:
        """Caption videos ``(Q, D)`` from their support-set attention over ``support`` (an index
        of this run) under the run's own mask; see :func:`ssbctl.inference.caption.caption_videos`."""
        from ssbctl.inference.caption import caption_videos

        return caption_videos(self, video_embeddings, support, ids=ids, paths=paths, beam=beam, top=top)


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str = "auto") -> LoadedRun:
    """Load a run's model from its latest (or a named) checkpoint, in eval mode."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    recipe = read_run_recipe(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    model, tokenizer = build_run_model(run_dir, recipe)
    load_weights(model, ckpt)
    dev = resolve_device(device)
    return LoadedRun(run_dir, recipe, model.to(dev).eval(), tokenizer, ckpt, dev)


def _backbone(spec: dict[str, Any], device: str) -> Backbone:
    options = {k: v for k, v in spec.items() if k not in ("name", "dim")}
    if spec["name"] == "imported":
        raise UserError("this run was trained on imported features: new videos need the same extractor")
    if spec["name"] != "pixels":
        options["device"] = device
    return build_backbone(spec["name"], **options)


class VideoEmbedder:
    """Everything between a video file and the run's embedding of it."""

    def __init__(self, run: LoadedRun, workers: int = 2) -> None:
        self.run, self.workers = run, workers
        specs = read_expert_specs(run.run_dir)
        self.backbones = [_backbone(s["backbone"], run.device.type) for s in specs]
        self.samplings = [Sampling(**s["sampling"]) for s in specs]
        self.decoders: dict[int, str] = {}  # set by features(): which decoder read each path (decord, pyav)

    def features(self, paths: list[Path], progress: Progress | None = None
                 ) -> Iterator[tuple[int, list[torch.Tensor] | None, str | None, bytes | None]]:
        """Per path: its features per expert (or None and the reason) and a thumbnail. Which
        decoder read each path lands in ``self.decoders`` (joined with ``+`` when experts differ)."""
        per_expert: list[dict[int, Any]] = []
        thumbs: dict[int, bytes] = {}
        used: dict[int, list[str]] = {}
        for e, (backbone, sampling) in enumerate(zip(self.backbones, self.samplings)):
            results: dict[int, Any] = {}
            for n, (key, decoded, reason) in enumerate(DecodePool(sampling, self.workers).map(enumerate(paths)), 1):
                if decoded is None:
                    results[key] = reason
                    continue
                frames = decoded.frames
                results[key] = backbone.encode(frames)
                used.setdefault(key, []).append(str(decoded.decoder))
                if e == 0:
                    thumbs[key] = thumbnail_png(frames[len(frames) // 2])
                if progress and e == len(self.backbones) - 1:
                    progress(n, len(paths))
            per_expert.append(results)
        self.decoders = {k: "+".join(dict.fromkeys(names)) for k, names in used.items()}
        for i in range(len(paths)):
            reasons = [r[i] for r in per_expert if isinstance(r[i], str)]
            if reasons:
                yield i, None, reasons[0], None
            else:
                yield i, [r[i] for r in per_expert], None, thumbs.get(i)

    def embed(self, features: list[list[torch.Tensor]]) -> torch.Tensor:
        """Normalised embeddings ``(N, D)`` of per-video expert features."""
        if not features:
            return torch.zeros(0, self.run.model.cfg.embed_dim)
        return self.run.encode_features([[f[e] for f in features] for e in range(len(self.backbones))])
