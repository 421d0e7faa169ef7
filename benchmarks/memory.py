"""Peak memory of `ssbctl prepare` and `ssbctl index` at two dataset sizes: does it grow with the
chunk size or with the dataset? (issue 15, goal 4)

Every measurement is the real CLI command in a fresh process; its peak resident set size is the
``ru_maxrss`` that ``wait4`` reports for it (the kernel's high-water mark, VmHWM, of that process
alone), so peaks cannot leak from one size into the next. ``prepare``'s decode workers are
separate processes: their largest peak is reported apart (``RUSAGE_CHILDREN`` of the measured
process, read by a small wrapper). The baseline is a process that only imports torch and the CLI.

(a) ``ssbctl prepare custom`` (pixels backbone, default decode workers) on the first N of a set of
    generated shapes clips (default 1,000 and 2,000). The clips are generated once, unmeasured,
    into ``--work`` and reused by later runs.
(b) ``ssbctl index RUN --data STORE`` over a prepared store of N videos (default 50,000 and
    100,000) of random pixel-sized features (8 frames x 768, as the shapes recipe's pixels
    backbone writes them), written with ssbctl's own StoreWriter; RUN is a tiny shapes run (2
    steps, benchmarks/serve.py's build_run). Stores and run are cached in ``--work`` too.

    python benchmarks/memory.py --work /tmp/ssb-memory
    python benchmarks/memory.py --work /tmp/ssb-memory --videos 200 400 --embeddings 5000 10000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import ssbctl.data.prepare as prep_module  # what the measured commands run (chunk sizes named)
import ssbctl.retrieval.build as build_module

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


def measure(cmd: list[str]) -> tuple[float, float]:
    """``cmd``'s peak RSS in MiB (``wait4``'s ru_maxrss) and its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def child_main(argv: list[str]) -> None:
    """``--wrap CMD...``: run the ssbctl CLI in this process, then report the children's peak
    (the decode workers of prepare) on fd 2 as one JSON line."""
    from ssbctl.cli.app import main as cli_main

    code = cli_main(argv)
    if code:
        sys.exit(code)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"children_peak_mib": children}), file=sys.stderr)


def clips(work: Path, total: int, n: int, size: int) -> Path:
    """Annotations of the first ``n`` of ``total`` generated clips in ``work/raw-TOTAL-SIZE`` (generated
    in a separate process, once: ``generate`` skips a folder holding the same spec)."""
    raw = work / f"raw-{total}-{size}"
    subprocess.run([sys.executable, "-c", (
        "from dataclasses import replace; from pathlib import Path; "
        "from ssbctl.data.datasets.shapes import ShapesSpec, generate; "
        f"generate(Path({str(raw)!r}), replace(ShapesSpec(), num_videos={total}, frame_size={size}, "
        "min_seconds=2.0, max_seconds=3.0))")], check=True)
    rows = [json.loads(line) for line in (raw / "captions.jsonl").read_text().splitlines()]
    keep = sorted({r["video"] for r in rows})[:n]
    subset = raw / f"captions-{n}.jsonl"
    chosen = set(keep)
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["video"] in chosen))
    return subset


def make_store(work: Path, n: int) -> Path:
    """A store of ``n`` videos of random (8, 768) features, pixels-backbone manifest, train split."""
    store = work / f"store-{n}"
    if (store / "manifest.json").is_file():
        return store
    subprocess.run([sys.executable, "-c", (
        "import torch; from pathlib import Path; from ssbctl.data.backbones import PixelsBackbone; "
        "from ssbctl.data.store import StoreWriter; from ssbctl.data.video import Sampling; "
        f"w = StoreWriter(Path({str(store)!r}), 'synthetic', PixelsBackbone(), Sampling()); "
        "g = torch.Generator().manual_seed(0)\n"
        f"for i in range({n}): w.add(f'v{{i:07d}}', 'train', '', torch.randn(8, 768, generator=g), "
        "['a red circle moves to the left'])\n"
        "w.commit()")], check=True)
    return store


def make_run(work: Path) -> Path:
    """The tiny shapes run of benchmarks/serve.py (2 steps on 16 tiny clips)."""
    run = work / "tiny" / "run"
    if not (run / "run.json").is_file():
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; "
                f"from serve import build_run; build_run(Path({str(work / 'tiny')!r}))")
        subprocess.run([sys.executable, "-c", code], check=True)
    return run


def index_chunk() -> str:
    """What bounds ``index``'s working set in the ssbctl at hand."""
    chunk = getattr(build_module, "INDEX_CHUNK", None)
    return (f"features read {chunk} videos at a time, embedded 256 at a time" if chunk
            else "all features read at once, embedded 256 at a time")


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssb-memory"), help="Cache of clips, stores, run.")
    parser.add_argument("--videos", type=int, nargs=2, default=[1000, 2000], help="prepare sizes (clips).")
    parser.add_argument("--embeddings", type=int, nargs=2, default=[50000, 100000], help="index sizes (videos).")
    parser.add_argument("--size", type=int, default=64, help="Frame size of the generated clips.")
    parser.add_argument("--skip", choices=["prepare", "index"], default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs"
    base, _ = measure([sys.executable, "-c", "import torch, ssbctl.cli.app, ssbctl.data.prepare, ssbctl.inference.run"])
    rows = []
    if args.skip != "prepare":
        for n in args.videos:
            ann = clips(args.work, max(args.videos), n, args.size)
            out = args.work / f"prep-{n}"  # an earlier store there is replaced
            cmd = [sys.executable, str(Path(__file__).resolve()), "--wrap", "prepare", "custom", "--annotations",
                   str(ann), "--out", str(out), "--json"]
            peak, secs = measure_wrapped(cmd)
            manifest = json.loads((out / "manifest.json").read_text())
            rows.append({"what": f"prepare {n} clips", "n": n, "peak": peak[0], "workers_peak": peak[1], "s": secs,
                         "data": f"{du_mib(out):.0f} MiB features written "
                                 f"({manifest['counts']['videos']} videos x 8 x {manifest['backbone']['dim']} fp32)",
                         "chunk": "64 videos per work chunk, 512 per store shard, 2 decode workers"
                                  + ("" if hasattr(prep_module, "ChunkFiles") else "; every chunk file kept open")})
            print(json.dumps(rows[-1]), flush=True)
    if args.skip != "index":
        run = make_run(args.work)
        for n in args.embeddings:
            store = make_store(args.work, n)
            out = args.work / f"index-{n}"
            cmd = [sys.executable, "-m", "ssbctl", "index", str(run), "--data", str(store), "--out", str(out),
                   "--replace", "--device", "cpu", "--json"]
            index_peak, secs = measure(cmd)
            emb = (out / "embeddings.safetensors").stat().st_size / MIB
            rows.append({"what": f"index {n} videos", "n": n, "peak": index_peak, "workers_peak": None, "s": secs,
                         "data": f"{du_mib(store):.0f} MiB features on disk; {emb:.0f} MiB index embeddings",
                         "chunk": index_chunk()})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nbaseline (python -c 'import torch, ssbctl.cli.app, ...'): {base:.0f} MiB; {env_note}")
    print("| command | peak RSS MiB | above baseline MiB | decode workers' peak MiB | wall s | data | chunk size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        workers = f"{r['workers_peak']:.0f}" if r["workers_peak"] is not None else "-"
        print(f"| {r['what']} | {r['peak']:.0f} | {r['peak'] - base:.0f} | {workers} | {r['s']:.0f} | {r['data']} "
              f"| {r['chunk']} |")
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


def measure_wrapped(cmd: list[str]) -> tuple[tuple[float, float], float]:
    """``measure`` for ``--wrap`` commands: (own peak, decode workers' peak) in MiB, and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    children = json.loads(err.strip().splitlines()[-1])["children_peak_mib"]
    return (usage.ru_maxrss / 1024, children), time.perf_counter() - start


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        child_main(sys.argv[2:])
    else:
        main()
