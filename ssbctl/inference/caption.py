"""Captions from the support set: a video's attention over indexed videos under the run's own
mask, the bottleneck memory it yields, and greedy or beam-search decoding of that memory.

Generation is written against :class:`GenerationDecoder` (start id, end ids, next-token logits,
tokenizer ids), which the light ``CaptionDecoder`` and the T5 decoder both offer.

Which support videos a video may draw on follows the mask it was trained with: ``cross``, every
support video but itself (so the caption is built from *other* videos); ``identity``, itself
alone (plain captioning); ``full``, all of them and itself. "Itself" is the support rows with the
video's id (a video taken from the index), or with its path or its embedding (a video file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ssbctl.core.errors import UserError
from ssbctl.model.ssb import SSBModel

SAME_EMBEDDING_ATOL = 1e-4  # unit vectors this close are one video embedded twice (float noise)
QUERY_BLOCK = 64  # videos whose attention is computed together


class GenerationDecoder(Protocol):
    """What generation needs of a caption decoder (the light one and the T5 one)."""

    start_id: int  # decoder id fed first

    @property
    def end_ids(self) -> frozenset[int]:
        """Decoder ids that end a caption."""
        ...

    def next_logits(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, V)`` of the token after ``prefix (B, t)`` given ``memory (B, S, W)``."""
        ...

    def to_tokenizer_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids of decoder ids (negative where there is none)."""
        ...


class CaptioningRun(Protocol):
    """What captioning needs of a loaded run (``ssbctl.inference.run.LoadedRun``)."""

    model: SSBModel
    tokenizer: Any
    device: torch.device

    @property
    def source(self) -> str:
        """The run and checkpoint, as messages name them."""
        ...


class SupportVideos(Protocol):
    """Videos to draw on: an :class:`ssbctl.retrieval.index.Index` or anything shaped like it."""

    embeddings: torch.Tensor  # (N, D), L2-normalised, from the same run
    videos: list[dict[str, Any]]  # video_id, path, ... per row


@dataclass
class Generated:
    """One decoded token sequence (decoder ids after the start id; the end id included when reached)."""

    ids: list[int]
    log_prob: float  # sum of the tokens' log-probabilities
    score: float  # length-normalised: log_prob / len(ids) ** alpha
    ended: bool  # stopped at an end token (else at the length limit)


def _normalised(log_prob: float, length: int, alpha: float) -> float:
    return log_prob / max(length, 1) ** alpha


@torch.no_grad()
def greedy(decoder: GenerationDecoder, memory: torch.Tensor, max_len: int, alpha: float = 1.0) -> list[Generated]:
    """The most likely next token at each step, for a batch of memories ``(B, S, W)``, until an
    end token or ``max_len`` tokens."""
    batch = memory.shape[0]
    prefix = torch.full((batch, 1), decoder.start_id, dtype=torch.long, device=memory.device)
    totals = [0.0] * batch
    done = [False] * batch
    ends = decoder.end_ids
    for _ in range(max_len):
        logp = torch.log_softmax(decoder.next_logits(prefix, memory).double(), dim=-1)  # (B, V)
        best = logp.argmax(dim=-1)  # (B,)
        chosen = logp.gather(1, best[:, None]).squeeze(1).tolist()
        for b, token in enumerate(best.tolist()):
            if not done[b]:
                totals[b] += chosen[b]
                done[b] = token in ends
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        if all(done):
            break
    out = []
    for b, row in enumerate(prefix[:, 1:].tolist()):
        stop = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        out.append(Generated(row[:stop], totals[b], _normalised(totals[b], stop, alpha), done[b]))
    return out


@torch.no_grad()
def beam_search(decoder: GenerationDecoder, memory: torch.Tensor, beam: int, max_len: int,
                alpha: float = 1.0) -> Generated:
    """Beam search over one memory ``(1, S, W)``: the hypothesis of best length-normalised
    log-probability (``log_prob / length ** alpha``).

    Each step expands every live hypothesis and ranks the candidates by total log-probability;
    a candidate ending in an end token among the best ``beam`` is finished, and the best
    ``beam`` others live on. The search stops when ``beam`` hypotheses are finished, none lives,
    or ``max_len`` tokens are reached (live ones then count as finished, unended). With
    ``beam = 1`` this is exactly greedy decoding.
    """
    if beam < 1:
        raise ValueError("beam must be at least 1")
    ends = decoder.end_ids
    tokens = torch.full((1, 1), decoder.start_id, dtype=torch.long, device=memory.device)
    scores = torch.zeros(1, dtype=torch.float64, device=memory.device)
    finished: list[Generated] = []
    for _ in range(max_len):
        logp = torch.log_softmax(decoder.next_logits(tokens, memory.expand(tokens.shape[0], -1, -1)).double(), -1)
        vocab = logp.shape[1]
        top = (scores[:, None] + logp).flatten().topk(min(2 * beam, logp.numel()))
        keep_rows: list[int] = []
        keep_tokens: list[int] = []
        keep_scores: list[float] = []
        for rank, (total, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row, token = divmod(flat, vocab)
            if token in ends:
                if rank < beam:
                    ids = [*tokens[row, 1:].tolist(), token]
                    finished.append(Generated(ids, total, _normalised(total, len(ids), alpha), True))
            elif len(keep_rows) < beam:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(total)
        if len(finished) >= beam or not keep_rows:
            break
        tokens = torch.cat([tokens[keep_rows], torch.tensor(keep_tokens, device=tokens.device)[:, None]], dim=1)
        scores = torch.tensor(keep_scores, dtype=torch.float64, device=tokens.device)
    else:
        for row, total in enumerate(scores.tolist()):
            ids = tokens[row, 1:].tolist()
            finished.append(Generated(ids, total, _normalised(total, len(ids), alpha), False))
    return max(finished, key=lambda g: g.score)


@dataclass
class CaptionResult:
    """A video's caption and the support videos it was decoded from."""

    name: str  # the video's id, or its path
    caption: str
    log_prob: float  # total log-probability of the generated tokens (end token included)
    score: float  # length-normalised log-probability (what beam search ranks by)
    tokens: int  # generated tokens, end token included
    ended: bool  # False: cut at the length limit
    weights: torch.Tensor  # (S,) the full attention distribution over `rows` (sums to 1)
    rows: list[str | None]  # per support item: its video_id, or None for the video itself (not indexed)
    support: list[dict[str, Any]] = field(default_factory=list)  # the listed top-k: rank, video_id, weight, path

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (without the full weight vector)."""
        listed = sum(s["weight"] for s in self.support)
        return {"video": self.name, "caption": self.caption, "log_prob": self.log_prob, "score": self.score,
                "tokens": self.tokens, "ended": self.ended, "support_size": int((self.weights > 0).sum()),
                "listed_weight": listed, "support": self.support}


def _self_rows(support: SupportVideos | None, videos: torch.Tensor, ids: Sequence[str | None],
               paths: Sequence[str | Path | None]) -> list[list[int]]:
    """Per query, the support rows that are the video itself: same video_id (given), else same
    resolved path or the same embedding (within float noise)."""
    if support is None or not support.videos:
        return [[] for _ in range(videos.shape[0])]
    by_id: dict[str, list[int]] = {}
    by_path: dict[str, list[int]] = {}
    for row, record in enumerate(support.videos):
        by_id.setdefault(str(record["video_id"]), []).append(row)
        if record.get("path"):
            by_path.setdefault(str(Path(record["path"]).resolve()), []).append(row)
    gallery = support.embeddings.float()
    found = []
    for q in range(videos.shape[0]):
        if ids[q] is not None:
            found.append(by_id.get(str(ids[q]), []))
            continue
        path = paths[q]
        rows = set(by_path.get(str(Path(path).resolve()), [])) if path is not None else set()
        same = (gallery - videos[q].float().to(gallery.device)).abs().amax(dim=1) <= SAME_EMBEDDING_ATOL
        rows.update(torch.nonzero(same).flatten().tolist())
        found.append(sorted(rows))
    return found


def _allowed(mask: str, n_support: int, selves: list[list[int]], own: list[int]) -> torch.Tensor:
    """``(Q, S + Q)`` bool: the support rows each query may attend to, then the queries' own
    rows (one per query, for a video not in the support set). ``own[q]`` is the column of the
    query's own row, or -1 when the support set holds the video itself."""
    q = len(selves)
    allowed = torch.zeros(q, n_support + q, dtype=torch.bool)
    for i, rows in enumerate(selves):
        if mask == "cross":
            allowed[i, :n_support] = True
            allowed[i, rows] = False
        elif mask == "identity":
            allowed[i, rows] = True
        elif mask == "full":
            allowed[i, :n_support] = True
        else:
            raise ValueError(f"no support mask for {mask!r}")
        if own[i] >= 0 and mask != "cross":
            allowed[i, own[i]] = True
    return allowed


def run_decoder(run: CaptioningRun) -> GenerationDecoder:
    """The run's caption decoder, its end tokens taken from the run's tokenizer; a UserError for a
    run trained without a support set."""
    from ssbctl.model.decoder import CaptionDecoder

    decoder = run.model.decoder
    if decoder is None or run.model.support is None:
        raise UserError(f"{run.source} has no caption decoder: it was trained with model.support.mask = \"none\" "
                        f"(contrastive only), so it cannot caption videos")
    if isinstance(decoder, CaptionDecoder):
        tok = run.tokenizer
        decoder.set_end_tokens([getattr(tok, "sep_token_id", None), getattr(tok, "eos_token_id", None)])
    if not decoder.end_ids:
        raise UserError(f"{run.source}: the tokenizer's end token is not in the decoder's vocabulary")
    return decoder


def _text(run: CaptioningRun, decoder: GenerationDecoder, ids: list[int]) -> str:
    tokens = [t for t in decoder.to_tokenizer_ids(torch.tensor(ids, dtype=torch.long)).tolist() if t >= 0]
    return str(run.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


@torch.no_grad()
def caption_videos(run: CaptioningRun, videos: torch.Tensor, support: SupportVideos | None = None, *,
                   ids: Sequence[str | None] | None = None, paths: Sequence[str | Path | None] | None = None,
                   beam: int = 1, top: int = 5, max_len: int | None = None,
                   alpha: float = 1.0) -> list[CaptionResult]:
    """Caption each of ``videos`` (``(Q, D)`` embeddings from ``run``) from its support set.

    ``support``: the videos to draw on (an index of the same run); None only under ``identity``.
    ``ids``/``paths`` name each query (a video_id of the support set, or a file), which is how
    "itself" is found; ``beam`` 1 decodes greedily. ``top`` support videos are listed per video,
    heaviest first (a subset of the full distribution in ``weights``).
    """
    decoder = run_decoder(run)
    bottleneck = run.model.support
    assert bottleneck is not None  # run_decoder refuses a run without one
    mask = bottleneck.cfg.mask
    n = videos.shape[0]
    ids = list(ids) if ids is not None else [None] * n
    paths = list(paths) if paths is not None else [None] * n
    if len(ids) != n or len(paths) != n:
        raise ValueError("one id and one path (or None) per video")
    if support is None and mask != "identity":
        raise UserError(f"the run's support set is {mask}: captioning needs an index of videos to draw on")
    n_support = len(support.videos) if support is not None else 0
    max_len = max_len or run.model.cfg.text.max_tokens
    results: list[CaptionResult] = []
    gallery = (support.embeddings if support is not None else videos.new_zeros(0, videos.shape[1]))
    gallery = gallery.float().to(run.device)
    for start in range(0, n, QUERY_BLOCK):
        block = videos[start:start + QUERY_BLOCK].float().to(run.device)
        selves = _self_rows(support, block, ids[start:start + QUERY_BLOCK], paths[start:start + QUERY_BLOCK])
        own = [-1 if rows else n_support + i for i, rows in enumerate(selves)]
        allowed = _allowed(mask, n_support, selves, own).to(run.device)
        items = torch.cat([gallery, block])  # (S + q, D)
        weights = bottleneck.masked_attention(block, items, allowed)  # (q, S + q)
        empty = (~allowed.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"video {_name(ids, paths, start + empty[0])} has no other video to draw on under the "
                            f"cross mask: the index holds only itself")
        memory = bottleneck.read(weights, items)  # (q, slots, W)
        decoded = (greedy(decoder, memory, max_len, alpha) if beam == 1  # the whole block at once
                   else [beam_search(decoder, memory[i:i + 1], beam, max_len, alpha) for i in range(len(memory))])
        for i, gen in enumerate(decoded):
            results.append(_result(run, decoder, gen, weights[i], support, _name(ids, paths, start + i), own[i], top))
    return results


def _name(ids: Sequence[str | None], paths: Sequence[str | Path | None], q: int) -> str:
    return str(ids[q] if ids[q] is not None else paths[q] if paths[q] is not None else f"video {q + 1}")


def _result(run: CaptioningRun, decoder: GenerationDecoder, gen: Generated, row: torch.Tensor,
            support: SupportVideos | None, name: str, own: int, top: int) -> CaptionResult:
    """The caption record of one video: text, scores, the full distribution and its top ``top``."""
    n_support = len(support.videos) if support is not None else 0
    columns = list(range(n_support)) + ([own] if own >= 0 else [])
    weights = row[columns].double().cpu()
    rows: list[str | None] = [str(v["video_id"]) for v in support.videos] if support is not None else []
    rows += [None] if own >= 0 else []
    listed = []
    for rank, j in enumerate(torch.argsort(weights, descending=True)[:top].tolist(), 1):
        if weights[j] <= 0:
            break
        record = support.videos[j] if support is not None and j < n_support else {"video_id": name, "path": name}
        listed.append({"rank": rank, "video_id": str(record["video_id"]), "weight": float(weights[j]),
                       "path": str(record.get("path", ""))})
    return CaptionResult(name, _text(run, decoder, gen.ids), gen.log_prob, gen.score, len(gen.ids), gen.ended,
                         weights, rows, listed)
