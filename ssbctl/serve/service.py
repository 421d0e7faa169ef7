"""What ``ssbctl serve`` answers, without the web framework: text search, more-like-this, the
support-set attention behind a result, thumbnails and video files, over one loaded index and run.

The model and index are loaded once (:class:`Service` wraps the :class:`Searcher` that
``retrieve`` uses), so the JSON of a search is the one ``retrieve --json`` prints. Text queries
go through one worker thread that encodes and searches every query waiting at that moment as one
batch (:class:`Batcher`): under concurrent load a batch costs little more than one query, and the
model is only ever used by one thread at a time (a tokenizer is not safe to share between threads).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssbctl.data.decode_pool import DecodePool
from ssbctl.data.store import FeatureStore
from ssbctl.data.video import Sampling, thumbnail_png
from ssbctl.retrieval.explain import support_attention
from ssbctl.retrieval.search import Searcher
from ssbctl.serve.files import OpenVideo, RequestError, open_video, video_root

MAX_QUERY_CHARS = 500  # longer text queries are refused (422)
MAX_K = 100  # most results one request may ask for
MAX_BATCH = 64  # most queries encoded together
THUMB_CACHE = 2048  # thumbnails decoded from videos kept in memory (PNG bytes, ~5-20 KB each)
CAPTIONS_SHOWN = 5  # captions per video the page gets


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or Inf float replaced by None (strict JSON), as ``retrieve --json``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


Answer = tuple[list[dict[str, Any]], float]  # hits, and the seconds their batch took to encode and search


@dataclass
class _Job:
    text: str
    k: int
    future: Future[Answer]


class Batcher:
    """One thread that encodes and searches text queries, all those waiting at once as one batch."""

    def __init__(self, searcher: Searcher, lock: threading.Lock) -> None:
        self.searcher, self.lock = searcher, lock
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="ssbctl-search", daemon=True)
        self.thread.start()

    def submit(self, text: str, k: int) -> Future[Answer]:
        """Queue a query; the future gets its hits (as ``Index.search`` gives them) and the seconds
        its batch took, or the error."""
        future: Future[Answer] = Future()
        self.jobs.put(_Job(text, k, future))
        return future

    def close(self) -> None:
        """Stop the worker once the queries already queued are answered."""
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
            self._answer(batch)

    def _answer(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            with self.lock, torch.inference_mode():
                queries = self.searcher.encode_texts([j.text for j in batch])
                hits = self.searcher.described(self.searcher.index.search(queries, max(j.k for j in batch)))
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
            for job in batch:
                job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        for job, found in zip(batch, hits):
            job.future.set_result((found[: job.k], seconds))


class Service:
    """An index, the run that embeds its queries, and everything the pages and API ask of them."""

    def __init__(self, index_dir: Path | None = None, run_dir: Path | None = None, device: str = "auto") -> None:
        self.searcher = Searcher(index_dir, device, run_dir)
        self.index = self.searcher.index
        if self.index.embeddings.dtype != torch.float32:  # converted once, not at every search
            self.index.embeddings = self.index.embeddings.float()
        self.rows: dict[str, int] = {}
        for row, video in enumerate(self.index.videos):
            self.rows.setdefault(str(video["video_id"]), row)  # the first row of an id names it
        self.root = video_root(self.index.meta, self.index.videos)
        self.captions = self._captions()
        self.model_lock = threading.Lock()
        self.batcher = Batcher(self.searcher, self.model_lock)
        self._thumbs: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(2)  # videos decoded for thumbnails at once

    def _captions(self) -> dict[str, list[str]]:
        """Captions by video id, where the index knows them: from the prepared data it was built
        from (``index.json``'s source), when that is still there."""
        source = self.index.meta.get("source")
        if not isinstance(source, str) or not (Path(source) / "manifest.json").is_file():
            return {}
        try:
            rows = FeatureStore(Path(source)).captions
        except Exception:  # noqa: BLE001 - captions are a nicety; a damaged store leaves them out
            return {}
        found: dict[str, list[str]] = {}
        for row in rows:
            texts = found.setdefault(str(row.get("video_id")), [])
            if len(texts) < CAPTIONS_SHOWN and isinstance(row.get("caption"), str):
                texts.append(row["caption"])
        return found

    def close(self) -> None:
        """Stop the search worker."""
        self.batcher.close()

    def row(self, video_id: str) -> int:
        """The index row of a video id; 404 when the index has no such video."""
        row = self.rows.get(video_id)
        if row is None:
            raise RequestError(404, f"no video {video_id[:200]!r} in this index")
        return row

    def with_captions(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hits with each video's captions added (an empty list where the index knows none)."""
        return [{**h, "captions": self.captions.get(str(h["video_id"]), [])} for h in hits]

    def similar(self, video_id: str, k: int) -> list[dict[str, Any]]:
        """Top-``k`` videos like an indexed one (its stored embedding as the query; itself first)."""
        row = self.row(video_id)
        query = self.index.embeddings[row: row + 1].float()
        return finite(self.searcher.described(self.index.search(query, k))[0])

    def explain(self, text: str | None, video_id: str | None, k: int) -> dict[str, Any]:
        """The support-set attention among the top-``k`` results of a text or of an indexed video,
        as ``retrieve --explain`` draws it: videos, scores, weights (rows attend over columns),
        mask, and what the top result draws on."""
        if video_id is not None:
            row = self.row(video_id)
            query = self.index.embeddings[row: row + 1].float()
        else:
            with self.model_lock:
                query = self.searcher.encode_texts([text or ""])
        with self.model_lock, torch.inference_mode():
            return finite(support_attention(self.searcher.run, self.index, query, max(k, 2)))

    def video(self, video_id: str) -> OpenVideo:
        """The indexed video file, opened (403 outside the indexed folder, 404 when gone)."""
        return open_video(str(self.index.videos[self.row(video_id)].get("path") or ""), self.root, video_id)

    def thumbnail(self, video_id: str) -> bytes:
        """PNG thumbnail of a video: the index's own, else one frame of the video decoded (kept in
        a bounded in-memory cache keyed by the file's size and mtime; nothing is written)."""
        row = self.row(video_id)
        stored = self.index.thumbnail(row)
        if stored is not None:
            return stored.read_bytes()
        opened = self.video(video_id)  # the same checks as sending the video itself
        opened.close()
        key = (row, opened.size, opened.mtime_ns)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        with self._decoding:  # in a worker process: a decoder that crashes costs the thumbnail, not the server
            _, decoded, _ = next(DecodePool(Sampling(num_frames=1), workers=1, timeout=60).map([(0, opened.path)]))
        if decoded is None:
            raise RequestError(404, f"video {video_id[:200]!r} has no thumbnail (it cannot be decoded)")
        frames = decoded.frames
        png = thumbnail_png(frames[0])
        with self._thumbs_lock:
            self._thumbs[key] = png
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return png

    def health(self) -> dict[str, Any]:
        """What is being served: counts, the run and checkpoint, the index folder."""
        return {"status": "ok", "videos": len(self.index.videos), "dim": int(self.index.embeddings.shape[1]),
                "index": str(self.index.folder), "run": str(self.searcher.run.run_dir),
                "checkpoint": self.searcher.run.checkpoint.name, "captions": bool(self.captions)}
