"""Captioning from the support set: generation (greedy, beam search, a rigged decoder), the
attention under each mask, the Python API and ``ssbctl caption``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ssbctl.cli.app import main
from ssbctl.config import DecoderConfig, load_recipe
from ssbctl.data.store import FeatureStore
from ssbctl.inference.caption import beam_search, caption_videos, greedy
from ssbctl.inference.run import LoadedRun, load_run
from ssbctl.model.decoder import BOS, CaptionDecoder
from ssbctl.retrieval.build import index_store
from ssbctl.retrieval.index import Index
from ssbctl.training import train

WIDTH, MAX_TOKENS, TOKENIZER_SIZE = 32, 12, 50


def _decoder(seed: int = 0) -> CaptionDecoder:
    """A real light decoder (random weights, eval mode) over tokenizer ids 10..29, ending at id 11."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(hidden_dim=WIDTH, layers=2, heads=2, dropout=0.0)
    decoder = CaptionDecoder(cfg, TOKENIZER_SIZE, MAX_TOKENS, torch.arange(10, 30), end_tokens=[11])
    return decoder.eval()


def test_next_logits_equal_the_teacher_forced_logits() -> None:
    decoder = _decoder()
    memory = torch.randn(3, 4, WIDTH)
    caption = torch.randint(10, 30, (3, 7))
    logits, _ = decoder(caption, torch.ones_like(caption), memory)  # (3, 7, V): position t predicts token t
    prefix = torch.cat([torch.full((3, 1), BOS), decoder.lookup[caption]], dim=1)
    for t in range(7):
        torch.testing.assert_close(decoder.next_logits(prefix[:, :t + 1], memory), logits[:, t], rtol=1e-5,
                                   atol=1e-5)


def test_beam_one_is_greedy() -> None:
    decoder = _decoder(1)
    memories = torch.randn(8, 4, WIDTH) * 3
    ended = []
    for boost in (0.0, 1.0, 1.5):  # the end token's bias: from never ending to ending at once
        with torch.no_grad():
            decoder.head.bias[int(decoder.lookup[11])] += boost
        for m in range(8):
            memory = memories[m:m + 1]
            ref = greedy(decoder, memory, MAX_TOKENS)[0]
            one = beam_search(decoder, memory, 1, MAX_TOKENS)
            assert one.ids == ref.ids and one.ended == ref.ended
            assert one.log_prob == pytest.approx(ref.log_prob, rel=1e-9)
            ended.append(ref.ended)
            wide = beam_search(decoder, memory, 4, MAX_TOKENS)
            assert 1 <= len(wide.ids) <= MAX_TOKENS and wide.score == pytest.approx(wide.log_prob / len(wide.ids))
        # batched greedy decodes each memory as it would alone
        batched = greedy(decoder, memories, MAX_TOKENS)
        assert [g.ids for g in batched] == [greedy(decoder, memories[m:m + 1], MAX_TOKENS)[0].ids for m in range(8)]
    assert any(ended) and not all(ended)  # both stops were compared: the end token and the length limit


def _rig(decoder: CaptionDecoder, sequence: list[int]) -> None:
    """Set the decoder's weights so that the token at step t is ``sequence[t]`` (decoder ids):
    every layer's residual branch outputs zero, position t is the basis vector e_t and the
    head's row of token v holds e_t for each step t that emits v."""
    with torch.no_grad():
        for layer in decoder.decoder.layers:
            for out in (layer.self_attn.out_proj, layer.multihead_attn.out_proj, layer.linear2):
                out.weight.zero_()
                out.bias.zero_()
        decoder.embed.weight.zero_()
        decoder.position.zero_()
        decoder.position[torch.arange(len(sequence)), torch.arange(len(sequence))] = 1.0
        decoder.head.weight.zero_()
        decoder.head.bias.zero_()
        for t, token in enumerate(sequence):
            decoder.head.weight[token, t] = 40.0


def test_a_rigged_decoder_yields_exactly_its_sequence() -> None:
    decoder = _decoder(2)
    end = int(decoder.lookup[11])
    sequence = [int(decoder.lookup[t]) for t in (15, 20, 15, 27, 13)] + [end]
    _rig(decoder, sequence)
    memory = torch.randn(2, 4, WIDTH)
    for got in [*greedy(decoder, memory, MAX_TOKENS), beam_search(decoder, memory[:1], 3, MAX_TOKENS)]:
        assert got.ids == sequence and got.ended  # stops at the end token, not at the length limit
        assert got.log_prob == pytest.approx(0.0, abs=1e-6) and got.log_prob <= 0
    assert decoder.to_tokenizer_ids(torch.tensor(sequence)).tolist() == [15, 20, 15, 27, 13, 11]
    # without its end token the same decoder runs to the length limit
    decoder.set_end_tokens([])
    cut = greedy(decoder, memory[:1], 4)[0]
    assert cut.ids == sequence[:4] and not cut.ended


@pytest.fixture(scope="module")
def trained(shapes_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small shapes run (cross mask, frozen real MiniLM) and an index of its training videos."""
    root = tmp_path_factory.mktemp("caption")
    recipe = load_recipe("shapes", [f'data.prepared="{shapes_store}"', "model.embed_dim=32",
                                    "model.video.hidden_dim=32", "model.decoder.hidden_dim=32",
                                    "train.batch_size=12", "train.max_steps=30", "train.warmup_steps=5",
                                    "train.lr=3e-3", 'data.eval_split=""', "model.support.slots=2",
                                    'model.support.mask="cross"'])
    train(recipe, root / "run")
    index_store(load_run(root / "run"), FeatureStore(shapes_store), ["train"]).save(root / "index")
    return root / "run", root / "index"


def _with_mask(run: LoadedRun, mask: str) -> LoadedRun:
    """The same trained weights read under another mask (the rule is the caller's, not a weight)."""
    assert run.model.support is not None
    run.model.support.cfg = dataclasses.replace(run.model.support.cfg, mask=mask)
    return run


def test_cross_attention_sums_to_one_and_never_lists_the_video_itself(trained) -> None:
    run_dir, index_dir = trained
    run, index = load_run(run_dir), Index.load(index_dir)
    ids = [v["video_id"] for v in index.videos[:4]]
    results = run.caption(index.embeddings[:4], index, ids=ids, top=3)
    assert len(results) == 4
    for vid, r in zip(ids, results):
        assert r.caption and r.tokens >= 1 and r.log_prob <= 0 and r.score <= 0
        assert r.weights.shape == (len(index.videos),)  # the full distribution over the index
        assert float(r.weights.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(r.weights[r.rows.index(vid)]) == 0.0
        assert len(r.support) == 3 and vid not in [s["video_id"] for s in r.support]
        # the listed videos are the heaviest three of that distribution, heaviest first
        top = torch.topk(r.weights, 3).values.tolist()
        assert [s["weight"] for s in r.support] == pytest.approx(top)
    # a video file's embedding (no id) is found in the index by its embedding, and kept out too
    by_embedding = caption_videos(run, index.embeddings[:1], index, top=len(index.videos))
    assert ids[0] not in [s["video_id"] for s in by_embedding[0].support]
    assert float(by_embedding[0].weights[0]) == 0.0


def test_identity_and_full_masks_follow_the_rule(trained) -> None:
    run_dir, index_dir = trained
    index = Index.load(index_dir)
    vid = index.videos[2]["video_id"]
    identity = _with_mask(load_run(run_dir), "identity").caption(index.embeddings[2:3], index, ids=[vid])[0]
    assert [(s["video_id"], s["weight"]) for s in identity.support] == [(vid, pytest.approx(1.0))]
    # a video that is not in the support set draws on itself under identity, and on all plus itself under full
    outside = index.embeddings[2:3]
    alone = _with_mask(load_run(run_dir), "identity").caption(outside, None, paths=["elsewhere.mp4"])[0]
    assert alone.rows == [None] and float(alone.weights[0]) == pytest.approx(1.0)
    full = _with_mask(load_run(run_dir), "full").caption(outside, Index(index.embeddings[3:], index.videos[3:]),
                                                          paths=["elsewhere.mp4"], top=100)[0]
    assert full.rows[-1] is None and len(full.rows) == len(index.videos) - 2
    assert float(full.weights.sum()) == pytest.approx(1.0, abs=1e-6) and bool((full.weights > 0).all())


def test_caption_cli_json_shape_and_table(trained, tmp_path: Path, capsys) -> None:
    run_dir, index_dir = trained
    index = Index.load(index_dir)
    ids = [index.videos[0]["video_id"], index.videos[5]["video_id"]]
    assert main(["caption", str(run_dir), "--index", str(index_dir), "--ids", ",".join(ids), "--beam", "3",
                 "--top", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"run", "checkpoint", "mask", "beam", "index", "captions"}
    assert doc["mask"] == "cross" and doc["beam"] == 3 and [c["video"] for c in doc["captions"]] == ids
    for c in doc["captions"]:
        assert set(c) == {"video", "caption", "log_prob", "score", "tokens", "ended", "support_size",
                          "listed_weight", "support"}
        assert isinstance(c["caption"], str) and c["support_size"] == len(index.videos) - 1
        assert [s["rank"] for s in c["support"]] == [1, 2]
        assert set(c["support"][0]) == {"rank", "video_id", "weight", "path"}
        assert c["listed_weight"] == pytest.approx(sum(s["weight"] for s in c["support"]))
    sheet = tmp_path / "support.png"
    assert main(["caption", str(run_dir), "--index", str(index_dir), "--ids", ids[0], "--sheet", str(sheet)]) == 0
    text = capsys.readouterr().out
    assert ids[0] in text and "of the attention" in text and sheet.read_bytes()[:4] == b"\x89PNG"


def test_caption_cli_refuses_a_run_without_a_decoder_and_bad_arguments(trained, tiny_recipe_args, shapes_raw: Path,
                                                                       capsys) -> None:
    run_dir, index_dir = trained
    none = load_recipe("shapes", tiny_recipe_args("none", **{"model.support.mask": "none", "train.max_steps": 1,
                                                             "data.eval_split": ""}))
    train(none, Path(none.train.output_dir))
    clip = sorted((shapes_raw / "videos").glob("*.mp4"))[0]
    assert main(["caption", none.train.output_dir, "--video", str(clip)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and 'model.support.mask = "none"' in message
    assert "no caption decoder" in message and len(message.strip().splitlines()) == 1
    for args, words in ((["--index", str(index_dir), "--ids", "nope"], "no such video"),
                        ([], "give --video"),
                        (["--video", str(clip), "--ids", "x"], "does not go with --video"),
                        (["--index", str(index_dir), "--beam", "0"], "at least 1")):
        assert main(["caption", str(run_dir), *args]) == 2, args
        assert words in capsys.readouterr().err


def test_the_benchmark_reads_the_generators_own_captions_right() -> None:
    """benchmarks/caption_shapes.py's attribute check, on the generator's captions of 300 scenes:
    every attribute a caption names is found as the scene's (the colour may be left out)."""
    import importlib.util

    import numpy as np

    from ssbctl.data.datasets.shapes import ShapesSpec, captions, sample_scene

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "caption_shapes.py"
    spec = importlib.util.spec_from_file_location("caption_shapes", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scenes, hyps = {}, {}
    for i in range(300):
        rng = np.random.default_rng([7, i])
        scenes[str(i)] = sample_scene(rng, ShapesSpec())
        hyps[str(i)] = captions(rng, scenes[str(i)], 1)[0]
    shares = bench.attribute_shares(hyps, scenes)
    assert shares["shape"] == 100.0 and shares["motion"] == 100.0
    assert 80.0 <= shares["colour"] < 100.0  # 10% of noun phrases leave the colour out
    wrong = {k: "a big green wedge rises" for k in hyps}  # one fixed caption: right only by chance
    assert max(bench.attribute_shares(wrong, scenes).values()) < 40.0
