"""Video encoders over per-frame features of one or more experts: MMT's temporal transformer, or
CLIP4Clip's seqTransf (the mean of the frame embeddings plus a residual temporal transformer)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssbctl.config import VideoEncoderConfig
from ssbctl.core.errors import UserError


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(B, T, W)`` over the frames where ``valid`` ``(B, T)`` is True; zeros for none."""
    weights = valid.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, W)


class VideoEncoder(nn.Module):
    """Projects each expert's frame features to a common width, adds position and expert-type
    embeddings, runs a transformer over all tokens and mean-pools the valid ones to ``(B, D)``.

    ``kind = "transformer"``: that pooled output through ``proj`` is the embedding (random at step 0).
    ``kind = "mean_residual"`` (CLIP4Clip's seqTransf): the embedding is the mean of each expert's
    frames (taken as they are when their size is ``embed_dim``, else through a Linear in ``bases``;
    several experts' means averaged) plus the transformer's pooled output through ``proj``, which
    starts at zero. So at step 0 the embedding is the mean of the frame embeddings: with one expert
    of CLIP's projected image embeddings, CLIP's zero-shot video embedding. A ``bases`` Linear is
    zero-initialised when some expert needs none (step 0 is then that expert's mean), else random.

    At step 0 the transformer's own parameters get an exactly-zero gradient (they feed a zero
    ``proj``); from the first update of ``proj`` on they get a real one. Under DistributedDataParallel
    a zero gradient is still a gradient (every rank reduces it), so nothing is left unused.
    """

    def __init__(self, cfg: VideoEncoderConfig, embed_dim: int) -> None:
        super().__init__()
        if not cfg.input_dims:
            raise UserError("model.video.input_dims is empty: it must be set from the prepared data")
        self.cfg = cfg
        width = cfg.hidden_dim
        # a pixel stem reads the main (first) expert's frames as images; other experts are not pixels
        self.inputs = nn.ModuleList(nn.Linear(d, width) if cfg.stem == "linear" or e > 0
                                    else PixelStem(d, width, values=cfg.stem == "conv")
                                    for e, d in enumerate(cfg.input_dims))
        self.position = nn.Parameter(torch.randn(cfg.max_frames, width) * 0.02)
        self.expert_type = nn.Parameter(torch.randn(len(cfg.input_dims), width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        self.bases: nn.ModuleList | None = None
        if cfg.kind == "mean_residual":
            self.bases = _frame_bases(cfg.input_dims, embed_dim)
            nn.init.zeros_(self.proj.weight)  # the residual starts at zero: step 0 is the frames' mean
            nn.init.zeros_(self.proj.bias)

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """``features[e]``: ``(B, T_e, dim_e)``; ``masks[e]``: ``(B, T_e)`` True on real frames."""
        tokens = []
        for e, (x, inp) in enumerate(zip(features, self.inputs)):
            if x.shape[1] > self.cfg.max_frames:
                raise UserError(f"{x.shape[1]} frames exceed model.video.max_frames={self.cfg.max_frames}")
            tokens.append(inp(x) + self.position[: x.shape[1]] + self.expert_type[e])  # (B, T_e, W)
        x = torch.cat(tokens, dim=1)  # (B, T, W)
        valid = torch.cat(masks, dim=1)  # (B, T)
        x = self.norm(self.transformer(x, src_key_padding_mask=~valid))
        out = self.proj(masked_mean(x, valid))  # (B, D)
        if self.bases is None:
            return out
        means = [base(masked_mean(f, m)) for f, m, base in zip(features, masks, self.bases)]
        return torch.stack(means).mean(0) + out  # (B, D)


class PixelStem(nn.Module):
    """Frame features of ``pixels`` (``3 x s x s`` values in [-1, 1]) to ``width``: two 3x3
    convolutions whose outputs are max- and mean-pooled over positions (what things are, wherever
    they are), projected to ``width``; and where things are, either from a Linear over the values
    (``values=True``, stem ``conv``) or from two coordinate channels beside the colours
    (``values=False``, stem ``cnn``). The Linear sees every pixel, which lets a model tell its
    training videos apart by their pixels alone; the coordinates give the convolutions only
    where an activation is."""

    coords: torch.Tensor | None  # (2, s, s) row and column in [-1, 1], for ``values=False``

    def __init__(self, dim: int, width: int, channels: int = 32, values: bool = True) -> None:
        super().__init__()
        side = round((dim / 3) ** 0.5)
        if 3 * side * side != dim:
            raise UserError(f"recipe key 'model.video.stem' = \"{'conv' if values else 'cnn'}\" reads the main "
                            f"expert's frames as 3 x s x s pixels; it has {dim} values per frame "
                            "(use stem = \"linear\")")
        self.side = side
        self.linear: nn.Linear | None = nn.Linear(dim, width) if values else None
        grid = torch.linspace(-1.0, 1.0, side)
        self.register_buffer("coords", None if values else torch.stack(torch.meshgrid(grid, grid, indexing="ij")),
                             persistent=False)
        self.convs = nn.Sequential(nn.Conv2d(3 if values else 5, channels, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GELU())
        self.pooled = nn.Linear(4 * channels, width)

    def shape_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 3*s*s)`` to the position-pooled CNN features ``(..., 4 * channels)``."""
        lead = x.shape[:-1]
        images = x.reshape(-1, 3, self.side, self.side)  # (N, 3, s, s)
        if self.coords is not None:
            images = torch.cat([images, self.coords.to(images.dtype).expand(len(images), -1, -1, -1)], dim=1)
        # channels-last (oneDNN's and cuDNN's convolutions run faster on it), pooled as the (N, s/2 * s/2, 2C)
        # view that is contiguous then, so that the backward pass stays channels-last; same values. max()
        # rather than amax(): its backward writes the gradient at one index per channel instead of comparing
        # every position with the maximum (a tie's gradient goes to one of the tied positions, not split)
        maps = self.convs(images.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1).flatten(1, 2)
        pooled = torch.cat([maps.max(dim=1).values, maps.mean(dim=1)], dim=1)  # (N, 4C)
        return pooled.reshape(*lead, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shapes = self.pooled(self.shape_features(x))  # (..., width)
        return shapes if self.linear is None else self.linear(x) + shapes


def _frame_bases(input_dims: tuple[int, ...], embed_dim: int) -> nn.ModuleList:
    """Per expert, what maps its frames' mean into the joint space: nothing (Identity) when its
    size is ``embed_dim``, else a Linear, zero-initialised when some expert needs none."""
    passthrough = embed_dim in input_dims
    bases = nn.ModuleList()
    for dim in input_dims:
        if dim == embed_dim:
            bases.append(nn.Identity())
            continue
        linear = nn.Linear(dim, embed_dim)
        if passthrough:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        bases.append(linear)
    return bases
