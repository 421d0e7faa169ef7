"""Optional faiss backend (``pip install ssbctl[faiss]``): an approximate index for collections
too large to scan, stored beside the exact embeddings, with its measured recall recorded.

``IVF`` partitions the vectors into ``nlist`` cells and scans ``nprobe`` of them per query
(``IVF{nlist},Flat``), or also compresses them (``IVF{nlist},PQ{m}``) to go beyond memory; the
file is memory-mapped at query time. Recall@k against exact search is measured on held-in
queries when the index is built and written to ``index.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssbctl.core.errors import UserError

FAISS_FILE = "faiss.index"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("the faiss backend needs faiss-cpu: pip install 'ssbctl[faiss]'") from None
    return faiss


def build_ann(embeddings: torch.Tensor, folder: Path, factory: str = "", nprobe: int = 16,
              sample: int = 200, k: int = 10) -> dict[str, Any]:
    """Train and write an approximate faiss index; return its description with measured recall@k."""
    if embeddings.shape[0] == 0:
        raise UserError("the index is empty: there is nothing to build a faiss index from")
    faiss = _faiss()
    x = np.ascontiguousarray(embeddings.float().numpy())
    n, dim = x.shape
    factory = factory or f"IVF{max(1, min(4096, int(4 * n ** 0.5), n // 8))},Flat"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = nprobe
    faiss.write_index(index, str(folder / FAISS_FILE))
    queries = x[np.random.default_rng(0).choice(n, size=min(sample, n), replace=False)]
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :k]
    _, approx = index.search(queries, k)
    recall = float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))
    return {"factory": factory, "nprobe": nprobe, f"recall@{k}": recall, "recall_queries": len(queries)}


def ann_search(folder: Path, queries: torch.Tensor, k: int,
               nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k (scores, rows) ``(Q, k)`` from the index folder's faiss file (memory-mapped).

    Slots faiss could not fill (the probed cells hold fewer than ``k`` vectors) have row -1."""
    faiss = _faiss()
    path = folder / FAISS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no faiss index; build it with `ssbctl index ... --faiss`")
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    scores, rows = index.search(np.ascontiguousarray(queries.float().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()
