"""reuse_freed_memory: inside, a freed large block stays resident in the process (for the next
allocation, without new pages); on exit glibc's defaults come back and what was kept is handed back."""

from __future__ import annotations

import platform
import resource

import torch

from ssbctl.core.memory import reuse_freed_memory

MIB = 1 << 20
BLOCK = 96 * MIB  # over glibc's largest mmap threshold (32 MiB): mmap'd and unmapped on free by default


def rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def allocate_and_free() -> None:
    """One BLOCK-sized tensor, written (so its pages are resident) and freed."""
    block = torch.ones(BLOCK // 4)
    del block


def test_freed_blocks_stay_inside_and_are_handed_back_after() -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    with reuse_freed_memory() as applied:
        assert applied is glibc
        if not glibc:
            return
        before = rss()
        allocate_and_free()
        kept = rss()
        assert kept > before + 64 * MIB, "the freed block went back to the kernel"
    assert rss() < kept - 64 * MIB, "on exit the kept block was not handed back"
    before = rss()
    allocate_and_free()
    assert rss() < before + 16 * MIB, "glibc's default (a large block unmapped on free) did not come back"


def test_disabled_changes_nothing() -> None:
    with reuse_freed_memory(enabled=False) as applied:
        assert applied is False
        before = rss()
        allocate_and_free()
        if platform.system() == "Linux":
            assert rss() < before + 16 * MIB
