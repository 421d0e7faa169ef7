"""``checkpoints/latest``: only a checkpoint name of the run counts; anything else is a one-line DataError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn

from ssbctl.core.errors import DataError
from ssbctl.engine.checkpoint import find_checkpoint, latest_checkpoint, save_checkpoint


def _run(path: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    model = nn.Linear(2, 2)
    for step in steps:
        save_checkpoint(path, model, {"note": step}, {"step": step, "epoch": 0}, keep=5)
    return path


def test_latest_names_the_newest_checkpoint(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004\n"
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000004"


@pytest.mark.parametrize("content", [
    "OTHER/checkpoints/step-00000004",  # an absolute path into another run
    "../../other/checkpoints/step-00000004",  # a relative one
    "step-00000002/../../../other/checkpoints/step-00000004",
    b"\xff\xfe\x00garbage",  # not UTF-8
    "step-4",  # not a name save_checkpoint writes
])
def test_latest_pointing_elsewhere_or_garbage_is_a_data_error(tmp_path: Path, content: str | bytes) -> None:
    run = _run(tmp_path / "run")
    other = _run(tmp_path / "other", (4,))
    pointer = run / "checkpoints" / "latest"
    if isinstance(content, str):
        content = content.replace("OTHER", str(other)).encode()
    pointer.write_bytes(content)
    with pytest.raises(DataError, match=f"{pointer} does not name a checkpoint of this run") as info:
        latest_checkpoint(run)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError):
        find_checkpoint(run)  # what evaluate/retrieve/index use


def test_latest_naming_a_removed_checkpoint_falls_back_to_the_newest_complete_one(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", (2, 4, 6))
    (run / "checkpoints" / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000006"
    (run / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000006"
