"""Datasets by name: each turns files on disk into a list of videos with captions and splits."""

from __future__ import annotations

from ssbctl.data.datasets.custom import VideoItem, read_custom

DATASETS = ("shapes", "custom")

__all__ = ["DATASETS", "VideoItem", "read_custom"]
