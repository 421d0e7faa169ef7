"""What ``ssbctl retrieve`` does, as a library: load an index and its run, answer queries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import read_jsonl
from ssbctl.core.paths import search_index
from ssbctl.core.validate import field
from ssbctl.inference.run import load_run
from ssbctl.model.embed import nonfinite_rows, require_finite
from ssbctl.retrieval.explain import attention_among, dual_softmax, support_attention
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.render import FRAMES, contact_sheet, heatmap, result_frames


class Searcher:
    """An index and the run that made it."""

    def __init__(self, index_dir: Path | None = None, device: str = "auto", run_dir: Path | None = None) -> None:
        """Load the index and its run: the one ``index.json`` records, or ``run_dir`` when the run
        has moved (the same checkpoint is looked for there)."""
        folder = Path(index_dir or search_index())
        self.index = Index.load(folder)
        bad = nonfinite_rows(self.index.embeddings)
        if bad:  # written by a broken checkpoint before `ssbctl index` refused to
            raise DataError(f"index {self.index.folder} holds {bad} of {len(self.index.videos)} non-finite "
                            f"(NaN or Inf) embeddings; build it again from a sound checkpoint")
        field(self.index.meta, "run", str, f"{folder / 'index.json'}")  # the run that embeds queries
        self.run = load_run(run_dir or self.index.meta["run"], self.index.meta.get("checkpoint"), device)
        self._row_of = {v["video_id"]: i for i, v in enumerate(self.index.videos)}
        self._captions: dict[str, str] | None = None
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
            return self.described(dual_softmax(self.index, queries, self.encode_texts(bank), k))
        return self.described(self.index.search(queries, k))

    def videos_for_video(self, path: Path, k: int) -> list[list[dict[str, Any]]]:
        """Top-k indexed videos most like a video file."""
        return self.described(self.index.search(self.run.encode_video([path]), k))

    def captions_for_video(self, path: Path, captions: list[str], k: int) -> list[dict[str, Any]]:
        """The ``k`` captions of a bank that best describe a video file."""
        video = self.run.encode_video([path])
        scores = (self.encode_texts(captions) @ video.t()).flatten()
        top = torch.argsort(scores, descending=True)[:k].tolist()
        return [{"rank": r + 1, "caption": captions[i], "score": float(scores[i])} for r, i in enumerate(top)]

    def described(self, results: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        """Hits with the video's split and, when the index knows one, its caption beside the id."""
        captions = self.captions()
        described = []
        for hits in results:
            rows = []
            for hit in hits:
                extra = {"split": str(self.index.videos[self._row_of[hit["video_id"]]].get("split", ""))}
                if hit["video_id"] in captions:
                    extra["caption"] = captions[hit["video_id"]]
                rank, video_id = hit.pop("rank"), hit.pop("video_id")
                rows.append({"rank": rank, "video_id": video_id, **extra, **hit})
            described.append(rows)
        return described

    def captions(self) -> dict[str, str]:
        """A caption per video id, when the index knows them: a ``caption`` in its rows, or else the
        first caption of each video in the prepared-data folder it was built from (``source``),
        while that folder is there. Captions only label results: an unreadable file gives none."""
        if self._captions is None:
            known = {v["video_id"]: v["caption"] for v in self.index.videos if isinstance(v.get("caption"), str)}
            source = self.index.meta.get("source")
            if not known and isinstance(source, str) and (Path(source) / "manifest.json").is_file():
                try:
                    for row in read_jsonl(Path(source) / "captions.jsonl"):
                        if isinstance(row, dict) and isinstance(row.get("caption"), str):
                            known.setdefault(str(row.get("video_id")), row["caption"])
                except (OSError, UnicodeDecodeError, ValueError, UserError, DataError):
                    known = {}
            self._captions = {k: v for k, v in known.items() if k in self._row_of}
        return self._captions

    def sheet(self, labels: list[str], results: list[list[dict[str, Any]]], k: int, out: Path,
              frames: int = FRAMES) -> tuple[int, int]:
        """Contact sheet of every query's top-k results, each a strip of ``frames`` frames over time
        (decoded from the video file; the index's thumbnail when the file is gone)."""
        rows = []
        for label, hits in zip(labels, results):
            strips = []
            for h in hits:
                row = self._row_of[h["video_id"]]
                strips.append(result_frames(self.index.videos[row]["path"], self.index.thumbnail(row), frames))
            rows.append((label, hits, strips))
        return contact_sheet(rows, k, out, frames)

    def explain(self, label: str, hits: list[dict[str, Any]], query: Callable[[], torch.Tensor],
                out: Path) -> dict[str, Any]:
        """Support-set attention among a query's results ``hits`` (as shown, in their rank order;
        with one hit, the next best video joins it: a video cannot draw on itself). Writes the
        heatmap PNG to ``out``; returns the attention: videos, scores, weights, mask, draws_on.
        ``query`` embeds the query, for that case only."""
        if len(hits) >= 2:
            result = attention_among(self.run, self.index, [self._row_of[h["video_id"]] for h in hits],
                                     [float(h["score"]) if h.get("score") is not None else float("nan")
                                      for h in hits])
        else:
            result = support_attention(self.run, self.index, query(), 2)
        heatmap(result["weights"], result["videos"],
                f"support-set attention ({result['mask']}) among the top {len(result['videos'])} for {label!r}", out)
        return result
