"""Training pairs from a feature store, batching with padding, and a resumable epoch sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ssbctl.core.errors import DataError, UserError
from ssbctl.data.batch import Batch
from ssbctl.data.store import Store


def split_pairs(store: Store, split: str) -> list[tuple[int, str]]:
    """The (video position in the split, caption) pairs of a split, from the store's lists alone."""
    index = {v["video_id"]: i for i, v in enumerate(store.split_videos(split))}
    return [(index[c["video_id"]], c["caption"]) for c in store.split_captions(split) if c["video_id"] in index]


def check_global_batch(batch_size: int, pairs: int, world: int = 1, split: str = "the training split") -> None:
    """Refuse a global batch that cannot be split evenly over ``world`` processes, or that is
    larger than the ``pairs`` of the split (it could only be shrunk, silently changing the
    support set and the negatives the recipe asks for)."""
    if batch_size % world:
        raise UserError(f"train.batch_size={batch_size} (the global batch) must be divisible by "
                        f"the {world} processes")
    if batch_size > pairs:
        raise UserError(f"train.batch_size={batch_size} (the global batch) is larger than the {pairs} "
                        f"(video, caption) pairs of {split}; lower train.batch_size")


def check_finite_features(store: Store, videos: list[dict[str, Any]],
                          features: list[list[torch.Tensor]], split: str) -> None:
    """Raise a DataError naming the store and the count when any video's features hold NaN or Inf.

    ``prepare`` never writes such features, but a store written or altered by other tools can
    hold them; every batch with one such video has a non-finite loss (and every score one)."""
    roots = [store.root, *(other.root for other in getattr(store, "extra", []))]
    for root, expert in zip(roots, features):
        bad = [videos[i]["video_id"] for i, f in enumerate(expert) if not torch.isfinite(f).all()]
        if bad:
            raise DataError(f"{root}: {len(bad)} of {len(videos)} videos of split '{split}' have non-finite "
                            f"(NaN or Inf) features, e.g. {bad[0]}; prepare the data again")


class PairDataset(Dataset):
    """Every (video, caption) pair of one split, with the videos' features held in memory."""

    def __init__(self, store: Store, split: str) -> None:
        self.videos = store.split_videos(split)
        self.features = store.load_experts(self.videos)  # [expert][video] (T, dim)
        check_finite_features(store, self.videos, self.features, split)
        self.pairs = split_pairs(store, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], str, int]:
        video, caption = self.pairs[i]
        return [expert[video] for expert in self.features], caption, video

    @property
    def captions(self) -> list[str]:
        """All captions of the split, in pair order."""
        return [c for _, c in self.pairs]


def pad_frames(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(T_i, dim)`` tensors into ``(B, T, dim)`` with a ``(B, T)`` validity mask."""
    length = max(f.shape[0] for f in features)
    out = features[0].new_zeros(len(features), length, features[0].shape[1])
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return out, mask


class Collate:
    """Pads frame features and tokenises captions into a :class:`Batch` (picklable for workers)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``(B, L)``."""
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    def __call__(self, items: list[tuple[list[torch.Tensor], str, int]]) -> Batch:
        padded = [pad_frames([f[e] for f, _, _ in items]) for e in range(len(items[0][0]))]
        ids, attention = self.tokenize([c for _, c, _ in items])
        return Batch([p[0] for p in padded], [p[1] for p in padded], ids, attention,
                     torch.tensor([v for _, _, v in items]))


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffles the pairs afresh each epoch from ``(seed, epoch)`` alone, so any epoch's batch
    order can be rebuilt; ``start`` skips the batches a resumed run has already trained on.

    Batches are global: under torchrun every rank builds the same ones and takes its
    ``rank``-th slice, so N processes see exactly the batches one process would.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        check_global_batch(batch_size, size, world)
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.per_rank = rank, batch_size // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the first batch to yield."""
        self.epoch, self.start = epoch, start

    def batches(self) -> list[list[int]]:
        """All full global batches of the current epoch (the incomplete last one is dropped)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        full = self.size // self.batch_size * self.batch_size
        return [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.per_rank
        for batch in self.batches()[self.start:]:
            yield batch[lo:lo + self.per_rank]

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start
