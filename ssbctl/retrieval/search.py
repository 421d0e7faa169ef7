"""What ``ssbctl retrieve`` does, as a library: load an index and its run, answer queries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssbctl.core.errors import DataError
from ssbctl.core.paths import default_index
from ssbctl.core.validate import field
from ssbctl.inference.run import load_run
from ssbctl.model.embed import nonfinite_rows, require_finite
from ssbctl.retrieval.explain import dual_softmax, support_attention
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.render import contact_sheet, heatmap


class Searcher:
    """An index and the run that made it."""

    def __init__(self, index_dir: Path | None = None, device: str = "auto", run_dir: Path | None = None) -> None:
        """Load the index and its run: the one ``index.json`` records, or ``run_dir`` when the run
        has moved (the same checkpoint is looked for there)."""
        folder = Path(index_dir or default_index())
        self.index = Index.load(folder)
        bad = nonfinite_rows(self.index.embeddings)
        if bad:  # written by a broken checkpoint before `ssbctl index` refused to
            raise DataError(f"index {self.index.folder} holds {bad} of {len(self.index.videos)} non-finite "
                            f"(NaN or Inf) embeddings; build it again from a sound checkpoint")
        field(self.index.meta, "run", str, f"{folder / 'index.json'}")  # the run that embeds queries
        self.run = load_run(run_dir or self.index.meta["run"], self.index.meta.get("checkpoint"), device)
        if self.index.embeddings.shape[1] != self.run.model.cfg.embed_dim:
            raise DataError(f"{self.index.folder}: embeddings of size {self.index.embeddings.shape[1]}, but the run "
                            f"{self.run.run_dir} embeds to {self.run.model.cfg.embed_dim}; rebuild the index")

    @property
    def source(self) -> str:
        """The run and checkpoint that embed queries, as error messages name them."""
        return self.run.source

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings; a DataError when the run's weights make them non-finite."""
        embedded = self.run.encode_text(texts)
        require_finite(self.source, texts=embedded)
        return embedded

    def videos_for_texts(self, texts: list[str], k: int, bank: list[str] | None = None) -> list[list[dict[str, Any]]]:
        """Top-k videos per text (re-ranked by dual softmax over ``bank`` when given)."""
        queries = self.encode_texts(texts)
        if bank:
            return dual_softmax(self.index, queries, self.encode_texts(bank), k)
        return self.index.search(queries, k)

    def videos_for_video(self, path: Path, k: int) -> list[list[dict[str, Any]]]:
        """Top-k indexed videos most like a video file."""
        return self.index.search(self.run.encode_video([path]), k)

    def captions_for_video(self, path: Path, captions: list[str], k: int) -> list[dict[str, Any]]:
        """The ``k`` captions of a bank that best describe a video file."""
        video = self.run.encode_video([path])
        scores = (self.encode_texts(captions) @ video.t()).flatten()
        top = torch.argsort(scores, descending=True)[:k].tolist()
        return [{"rank": r + 1, "caption": captions[i], "score": float(scores[i])} for r, i in enumerate(top)]

    def sheet(self, labels: list[str], results: list[list[dict[str, Any]]], k: int, out: Path) -> tuple[int, int]:
        """Contact sheet of every query's top-k thumbnails."""
        row_of = {v["video_id"]: i for i, v in enumerate(self.index.videos)}
        rows = [(label, hits, [self.index.thumbnail(row_of[h["video_id"]]) for h in hits])
                for label, hits in zip(labels, results)]
        return contact_sheet(rows, k, out)

    def explain(self, label: str, text: str | None, video: Path | None, k: int, out: Path) -> list[dict[str, Any]]:
        """Heatmap of the support-set attention among the query's top results; the top result's row."""
        query = self.encode_texts([text]) if text else self.run.encode_video([video])  # type: ignore[list-item]
        result = support_attention(self.run, self.index, query, max(k, 2))
        heatmap(result["weights"], result["videos"], f"support-set attention ({result['mask']}) for {label!r}", out)
        return [{"rank": i + 1, "video_id": d["video_id"], "weight": d["weight"]}
                for i, d in enumerate(result["draws_on"])]
