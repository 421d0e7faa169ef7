"""What ``ssbctl serve`` answers, without the web framework: text search, more-like-this, the
support-set attention behind a result, thumbnails and video files, over one loaded index and run.

The model and index are loaded once (:class:`Service` wraps the :class:`Searcher` that
``retrieve`` uses), so the JSON of a search is the one ``retrieve --json`` prints. Everything that
touches the model or the index's tensors runs on one worker thread (:class:`Batcher`), loading
included: text queries arriving together are encoded and searched as one batch (under concurrent
load a batch costs little more than one query); a tokenizer is not safe to share between threads;
and torch's OpenMP pool is fastest kept to one thread (encoding on a second thread after the model
was loaded on the first took 1.5-1.9x as long on 2 cores, measured with 8-query batches).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
GATHER_GAP = 0.005  # a batch waits this long for one more query (all a lone query waits) ...
GATHER_MAX = 0.015  # ... and no longer than this after its first query, however many keep coming
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


T = TypeVar("T")
Answer = tuple[list[dict[str, Any]], float, int]  # hits, the seconds their batch took, the batch's size


@dataclass
class _Job:
    text: str
    k: int
    future: Future[Answer]


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


class Batcher:
    """The one thread that uses the model and index: text queries waiting together are encoded and
    searched as one batch; any other work (:meth:`call`) runs there too, in the order it came."""

    def __init__(self, load: Callable[[], Searcher]) -> None:
        """Start the thread and load the searcher on it (``load``'s error is raised here)."""
        self.jobs: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="ssbctl-search", daemon=True)
        self.thread.start()
        try:
            self.searcher = self.call(load).result()
        except BaseException:
            self.close()
            raise

    def submit(self, text: str, k: int) -> Future[Answer]:
        """Queue a query; the future gets its hits (as ``Index.search`` gives them), the seconds
        its batch took to encode and search and how many queries it held, or the error."""
        future: Future[Answer] = Future()
        self.jobs.put(_Job(text, k, future))
        return future

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the worker thread; the future gets its result or its error."""
        future: Future[T] = Future()
        self.jobs.put(_Call(fn, future))
        return future

    def close(self) -> None:
        """Stop the worker once the work already queued is done."""
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            if isinstance(first, _Call):
                _run(first)
                continue
            batch, after = self._gather(first)
            self._answer(batch)
            if isinstance(after, _Call):
                _run(after)
            elif after is None:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], _Call | None | bool]:
        """The first query and those arriving right behind it, and what came after them: a call to
        run next, None to stop, or False for nothing.

        Clients answered by one batch send their next queries a few milliseconds apart; taking
        only those already queued would answer the first alone and make the rest wait for it and
        then for their own batch (two batches per request). So the batch waits up to
        ``GATHER_GAP`` for each next query (all a lone query waits), ``GATHER_MAX`` in all.
        """
        batch = [first]
        closes = time.perf_counter() + GATHER_MAX
        while len(batch) < MAX_BATCH:
            wait = min(GATHER_GAP, closes - time.perf_counter())
            try:
                job = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break  # a gap with no new query, or the window closed with none queued
            if not isinstance(job, _Job):
                return batch, job
            batch.append(job)
        return batch, False

    def _answer(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                queries = self.searcher.encode_texts([j.text for j in batch])
                hits = self.searcher.described(self.searcher.index.search(queries, max(j.k for j in batch)))
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
            for job in batch:
                job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        for job, found in zip(batch, hits):
            job.future.set_result((found[: job.k], seconds, len(batch)))


def _run(call: _Call) -> None:
    try:
        call.future.set_result(call.fn())
    except BaseException as exc:  # noqa: BLE001 - the caller gets the error, the worker lives on
        call.future.set_exception(exc)


def _load(index_dir: Path | None, run_dir: Path | None, device: str) -> Searcher:
    searcher = Searcher(index_dir, device, run_dir)
    if searcher.index.embeddings.dtype != torch.float32:  # converted once, not at every search
        searcher.index.embeddings = searcher.index.embeddings.float()
    return searcher


class Service:
    """An index, the run that embeds its queries, and everything the pages and API ask of them."""

    def __init__(self, index_dir: Path | None = None, run_dir: Path | None = None, device: str = "auto") -> None:
        self.batcher = Batcher(lambda: _load(index_dir, run_dir, device))
        self.searcher = self.batcher.searcher
        self.index = self.searcher.index
        self.rows: dict[str, int] = {}
        for row, video in enumerate(self.index.videos):
            self.rows.setdefault(str(video["video_id"]), row)  # the first row of an id names it
        self.root = video_root(self.index.meta, self.index.videos)
        self.captions = self._captions()
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

        def work() -> list[dict[str, Any]]:
            with torch.inference_mode():
                query = self.index.embeddings[row: row + 1].float()
                return finite(self.searcher.described(self.index.search(query, k))[0])
        return self.batcher.call(work).result()

    def explain(self, text: str | None, video_id: str | None, k: int) -> dict[str, Any]:
        """The support-set attention among the top-``k`` results of a text or of an indexed video,
        as ``retrieve --explain`` draws it: videos, scores, weights (rows attend over columns),
        mask, and what the top result draws on."""
        row = None if video_id is None else self.row(video_id)

        def work() -> dict[str, Any]:
            with torch.inference_mode():
                query = (self.searcher.encode_texts([text or ""]) if row is None
                         else self.index.embeddings[row: row + 1].float())
                return finite(support_attention(self.searcher.run, self.index, query, max(k, 2)))
        return self.batcher.call(work).result()

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
