"""Training-step throughput on this machine: clips/s and achieved FLOP/s against the measured
matrix-multiply peak, for the shapes recipe's model and a CLIP-sized configuration.

On a CPU (fp32) the CLIP-sized batch is cut to --cpu-batch; on CUDA the full device check runs
(benchmarks/device_check.sh, AMP included).

    python benchmarks/train_throughput.py --tokenizer .devcarry/minilm-tokenizer
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import device_check as dc
from matmul_peak import describe, matmul_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="MiniLM tokenizer folder (default: the builtin one).")
    parser.add_argument("--cpu-batch", type=int, default=16, help="CLIP-sized batch on the CPU.")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.tokenizer is None:
        from ssbctl.model.text_encoder import builtin_models

        args.tokenizer = builtin_models()["all-MiniLM-L6-v2"]
    if not torch.cuda.is_available():
        dc.CONFIGS["clip-sized"]["batch"] = args.cpu_batch
    work = Path(tempfile.mkdtemp(prefix="ssb-throughput-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # the best fp32 rate over sizes and both BLAS libraries, named
        measured = matmul_peak()
        print(describe(measured), flush=True)
        fp32_peak = measured["peak_gflops"] * 1e9
    else:
        fp32_peak = dc.peak_matmul(device, torch.float32, 8192)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "peak_tflops": {"fp32": fp32_peak / 1e12}}
    for name in dc.CONFIGS:
        trainer = dc.build_trainer(work, name, "fp32", args.tokenizer, smoke=False, device=device.type,
                                   videos=256 if device.type == "cpu" else 2048)
        report[f"{name}/parity"] = {"fp32/loss": dc.loss_parity(trainer)["fp32/loss"]}
        report[f"{name}/fp32"] = dc.time_steps(trainer, warmup=2, steps=args.steps)
        print(f"# {name}: {json.dumps(report[f'{name}/fp32'])}", flush=True)
        report[f"{name}/fp32/accum{dc.ACCUM}"] = dc.time_accumulated(
            work, name, "fp32", args.tokenizer, smoke=False, warmup=1, steps=args.steps, device=device.type,
            videos=256 if device.type == "cpu" else 2048)
    dc.print_report(report)


if __name__ == "__main__":
    main()
