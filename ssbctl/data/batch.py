"""The batch type: what the loader yields and the model consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One training batch of (video, caption) pairs."""

    video: list[torch.Tensor]  # per expert: (B, T, dim) frame features
    video_mask: list[torch.Tensor]  # per expert: (B, T) True on real frames
    input_ids: torch.Tensor  # (B, L) caption tokens
    attention_mask: torch.Tensor  # (B, L)
    video_index: torch.Tensor  # (B,) which video each pair shows; equal ids are positives

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch([move(v) for v in self.video], [move(m) for m in self.video_mask],
                     move(self.input_ids), move(self.attention_mask), move(self.video_index))

    def slice(self, lo: int, hi: int) -> Batch:
        """Pairs ``lo:hi`` of the batch (a micro-batch)."""
        return Batch([v[lo:hi] for v in self.video], [m[lo:hi] for m in self.video_mask],
                     self.input_ids[lo:hi], self.attention_mask[lo:hi], self.video_index[lo:hi])

    def pin_memory(self) -> Batch:
        """Page-locked copies, for DataLoader(pin_memory=True)."""
        return Batch([v.pin_memory() for v in self.video], [m.pin_memory() for m in self.video_mask],
                     self.input_ids.pin_memory(), self.attention_mask.pin_memory(),
                     self.video_index.pin_memory())
