"""``ssbctl serve``'s API on a trained tiny run and index, through Starlette's TestClient: the JSON
of ``retrieve --json``, Range requests, refused paths (traversal, encoded, absolute, symlinks out of
the indexed folder), unknown ids, bounds, the token and Host checks; and the command itself."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ssbctl.cli.app import main
from ssbctl.config import load_recipe
from ssbctl.data.store import FeatureStore
from ssbctl.inference.run import load_run
from ssbctl.retrieval.build import index_store
from ssbctl.retrieval.index import Index, index_meta
from ssbctl.training import train

from conftest import tiny_overrides

starlette = pytest.importorskip("starlette", reason="ssbctl[serve] is in the dev extra: install it")
from starlette.testclient import TestClient  # noqa: E402

from ssbctl.serve.app import LOOPBACK_NAMES, create_app  # noqa: E402
from ssbctl.serve.service import MAX_K, MAX_QUERY_CHARS, Service  # noqa: E402

QUERY = "a red circle moves to the left"


def build_served(root: Path, store: Path, text_model: Path) -> tuple[Path, Path]:
    """Train a tiny run on the shapes store and index its training videos (with thumbnails)."""
    recipe = load_recipe("shapes", tiny_overrides(store, text_model, root / "run", **{
        "train.max_steps": 30, "train.epochs": 20, 'data.eval_split': "", "model.video.dropout": 0.0}))
    train(recipe, root / "run")
    index_store(load_run(root / "run"), FeatureStore(store), ["train"]).save(root / "index")
    return root / "run", root / "index"


@pytest.fixture(scope="module")
def served(shapes_store: Path, tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_served(tmp_path_factory.mktemp("served"), shapes_store, tiny_text_model)


@pytest.fixture(scope="module")
def service(served: tuple[Path, Path]) -> Iterator[Service]:
    svc = Service(served[1])
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: Service) -> TestClient:
    return TestClient(create_app(service))


def retrieve_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main(["retrieve", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def same_hits(api: list[dict[str, Any]], cli: list[dict[str, Any]]) -> None:
    """The same JSON up to float rounding: the scores of a batch and of one query may differ in the last bits."""
    assert [{k: v for k, v in h.items() if k != "score"} for h in api] == \
        [{k: v for k, v in h.items() if k != "score"} for h in cli]
    assert [h["score"] for h in api] == pytest.approx([h["score"] for h in cli], abs=1e-4)


def test_search_returns_the_json_of_retrieve(served, client: TestClient, service: Service, capsys) -> None:
    response = client.get("/api/search", params={"q": QUERY, "k": 5})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert float(response.headers["server-timing"].split("dur=")[1].split(";")[0]) > 0
    cli = retrieve_json(["--query", QUERY, "--index", str(served[1]), "-k", "5"], capsys)
    same_hits(response.json(), cli)
    assert len(cli) == 5
    with_captions = client.get("/api/search", params={"q": QUERY, "k": 5, "captions": "1"}).json()
    store = FeatureStore(Path(service.index.meta["source"]))
    for hit in with_captions:  # the captions of the prepared data the index was built from
        assert hit["captions"] == [c["caption"] for c in store.captions if c["video_id"] == hit["video_id"]][:5]
        assert hit["captions"]


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer(service: Service) -> None:
    texts = [f"a {c} {s} moves to the left" for c in ("red", "green", "blue", "yellow") for s in ("circle", "box")]
    expected = service.searcher.described(service.index.search(service.searcher.encode_texts(texts), 3))
    start = threading.Barrier(len(texts))
    answers: dict[int, list[dict[str, Any]]] = {}

    def ask(i: int) -> None:
        start.wait()
        answers[i] = service.batcher.submit(texts[i], 3).result(timeout=120)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, hits in enumerate(expected):
        same_hits(answers[i], hits)


def test_queries_arriving_a_moment_apart_share_one_batch(service: Service, monkeypatch) -> None:
    """Queries sent one after another within the gather window are answered as one batch (the
    clients of one batch send their next queries a few milliseconds apart); a lone query is
    answered alone. The window is widened here so that a loaded machine cannot split the batch."""
    import ssbctl.serve.service as module

    monkeypatch.setattr(module, "GATHER_GAP", 0.5)
    monkeypatch.setattr(module, "GATHER_MAX", 5.0)
    texts = [f"a {c} box moves to the right" for c in ("red", "green", "blue")]
    futures = []
    for text in texts:
        futures.append(service.batcher.submit(text, 2))
        threading.Event().wait(0.05)  # each query after the previous one was taken off the queue
    answers = [f.result(timeout=120) for f in futures]
    assert [size for _, _, size in answers] == [3, 3, 3]
    expected = service.searcher.described(service.index.search(service.searcher.encode_texts(texts), 2))
    for (hits, _, _), want in zip(answers, expected):
        same_hits(hits, want)
    monkeypatch.setattr(module, "GATHER_GAP", 0.01)
    assert service.batcher.submit(texts[0], 2).result(timeout=120)[2] == 1


def test_every_use_of_the_model_runs_on_its_one_thread(client: TestClient, service: Service, monkeypatch) -> None:
    """Search, more-like-this and explain all run on the thread that loaded the model (torch's
    OpenMP pool is slower shared between threads; a tokenizer is not thread-safe)."""
    seen: set[str] = set()
    search, encode = service.index.search, service.searcher.encode_texts

    def spy_search(*args: Any, **kwargs: Any) -> Any:
        seen.add(threading.current_thread().name)
        return search(*args, **kwargs)

    def spy_encode(*args: Any, **kwargs: Any) -> Any:
        seen.add(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(service.index, "search", spy_search)
    monkeypatch.setattr(service.searcher, "encode_texts", spy_encode)
    video_id = service.index.videos[2]["video_id"]
    assert client.get("/api/search", params={"q": QUERY, "k": 3}).status_code == 200
    assert client.get(f"/api/similar/{video_id}", params={"k": 3}).status_code == 200
    assert client.get("/api/explain", params={"q": QUERY, "k": 3}).status_code == 200
    assert seen == {service.batcher.thread.name} and service.batcher.thread is not threading.main_thread()


def test_similar_puts_the_video_first_like_retrieve_video(served, client: TestClient, service: Service,
                                                          capsys) -> None:
    video = service.index.videos[3]
    response = client.get(f"/api/similar/{video['video_id']}", params={"k": 4})
    assert response.status_code == 200
    hits = response.json()
    assert hits[0]["video_id"] == video["video_id"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    cli = retrieve_json(["--video", video["path"], "--index", str(served[1]), "-k", "4"], capsys)
    assert cli[0]["video_id"] == video["video_id"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and set(hits[0]) == set(cli[0])


def test_explain_gives_the_support_set_attention(client: TestClient, service: Service) -> None:
    result = client.get("/api/explain", params={"q": QUERY, "k": 4}).json()
    top = [h["video_id"] for h in client.get("/api/search", params={"q": QUERY, "k": 4}).json()]
    assert result["videos"] == top
    weights = torch.tensor(result["weights"])
    assert weights.shape == (4, 4) and torch.allclose(weights.sum(dim=1), torch.ones(4), atol=1e-4)
    by_video = client.get("/api/explain", params={"video_id": top[0], "k": 3}).json()
    assert by_video["videos"][0] == top[0]


def test_a_user_error_is_a_400(client: TestClient, service: Service, monkeypatch) -> None:
    monkeypatch.setattr(service.searcher.run.model, "support", None)  # as a run trained without a support set
    response = client.get("/api/explain", params={"q": QUERY})
    assert response.status_code == 400 and "no support set" in response.json()["error"]


def test_health_and_page(client: TestClient, service: Service) -> None:
    health = client.get("/api/health").json()
    assert health["videos"] == len(service.index.videos) and health["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert "http" not in client.get("/static/app.js").text.replace("HTTP ", "")  # no CDN, no absolute URL


def test_video_range_requests(client: TestClient, service: Service) -> None:
    video = service.index.videos[0]
    data = Path(video["path"]).read_bytes()
    size = len(data)
    url = f"/media/video/{video['video_id']}"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "video/mp4"
    for header, start, end in (("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1), ("bytes=-50", size - 50, size - 1),
                               (f"bytes=10-{size + 1000}", 10, size - 1), ("bytes=0-0", 0, 0)):
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert part.content == data[start:end + 1] and int(part.headers["content-length"]) == end - start + 1
    for bad in (f"bytes={size}-", "bytes=5-2", "bytes=abc", "items=0-1", "bytes=0-1,4-5", "bytes=-0", "bytes=-",
                "bytes=²-3".encode("latin-1")):
        refused = client.get(url, headers={"Range": bad})
        assert refused.status_code == 416, bad
        assert refused.headers["content-range"] == f"bytes */{size}" and "error" in refused.json()
    head = client.head(url, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""


def test_thumbnails_from_the_index_and_from_the_video(served, client: TestClient, service: Service,
                                                      tmp_path: Path) -> None:
    from PIL import Image

    video = service.index.videos[1]
    png = client.get(f"/media/thumb/{video['video_id']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == service.index.thumbnail(1).read_bytes()
    bare = tmp_path / "bare"  # an index without stored thumbnails: made from the video, then cached
    index_store(service.searcher.run, FeatureStore(Path(service.index.meta["source"])), ["train"],
                thumbnails=False).save(bare)
    other = Service(bare)
    try:
        made = TestClient(create_app(other)).get(f"/media/thumb/{video['video_id']}")
        assert made.status_code == 200 and len(other._thumbs) == 1
        with Image.open(io.BytesIO(made.content)) as image:
            assert image.format == "PNG" and image.width > 0
        again = TestClient(create_app(other)).get(f"/media/thumb/{video['video_id']}")
        assert again.content == made.content and len(other._thumbs) == 1
    finally:
        other.close()


@pytest.fixture(scope="module")
def linked(served: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Service, bytes]:
    """An index of a video folder whose rows include a symlink leading outside it, a symlink
    inside it, a missing file and a text file; and the bytes of the secret outside."""
    root = tmp_path_factory.mktemp("linked")
    folder, outside = root / "videos", root / "outside"
    folder.mkdir()
    outside.mkdir()
    source = Index.load(served[1]).videos[0]["path"]
    shutil.copyfile(source, folder / "good.mp4")
    secret = outside / "secret.mp4"
    secret.write_bytes(b"SECRET" * 100)
    (folder / "escape.mp4").symlink_to(secret)
    (folder / "etc.mp4").symlink_to("/etc/passwd")
    (folder / "inside.mp4").symlink_to(folder / "good.mp4")
    (folder / "notes.txt").write_text("not a video")
    names = ["good", "escape", "etc", "inside", "gone", "notes"]
    paths = [folder / f"{n}.mp4" for n in names[:-1]] + [folder / "notes.txt"]
    run = load_run(served[0])
    embeddings = torch.nn.functional.normalize(torch.randn(len(names), run.model.cfg.embed_dim), dim=1)
    rows = [{"video_id": n, "path": str(p), "split": ""} for n, p in zip(names, paths)]
    Index(embeddings, rows, index_meta(run, folder)).save(root / "index")
    svc = Service(root / "index")
    yield svc, secret.read_bytes()
    svc.close()


def test_files_only_by_row_id_never_by_path(linked) -> None:
    svc, secret = linked
    client = TestClient(create_app(svc))
    assert client.get("/media/video/good").status_code == 200
    assert client.get("/media/video/inside").status_code == 200  # a link that stays inside the folder
    for kind in ("video", "thumb"):
        for attempt in ("escape", "etc"):  # symlinks out of the indexed folder
            refused = client.get(f"/media/{kind}/{attempt}")
            assert refused.status_code == 403 and "outside the indexed folder" in refused.json()["error"]
            assert secret not in refused.content and b"root:" not in refused.content
        assert client.get(f"/media/{kind}/gone").status_code == 404
        assert client.get(f"/media/{kind}/notes").status_code == 403
        for attempt in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd", "..%2Foutside%2Fsecret.mp4",
                        "good%2F..%2F..%2Foutside%2Fsecret.mp4", "%252e%252e%252fetc%252fpasswd"):
            response = client.get(f"/media/{kind}/{attempt}")
            assert response.status_code == 404, (kind, attempt)
            assert secret not in response.content and b"root:" not in response.content
    raw = client.get("/media/video/../../../etc/passwd")  # normalised by the client: still nothing served
    assert raw.status_code == 404 and b"root:" not in raw.content
    dotted = client.get("/media/video/good/../escape")  # normalised to the row "escape": refused as above
    assert dotted.status_code == 403 and secret not in dotted.content


def test_no_listing_and_no_files_by_path(client: TestClient) -> None:
    for path in ("/static/", "/static", "/media/video/", "/media/thumb/", "/static/..%2F..%2Fpyproject.toml",
                 "/static/index.html%00", "/static/../app.py", "/media/", "/etc/passwd", "/thumbs/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/json" and "\n" not in response.json()["error"]


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("/api/similar/no-such-video", "/media/thumb/no-such-video", "/media/video/no-such-video",
                 "/api/explain?video_id=no-such-video"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "no video" in response.json()["error"]


def test_query_and_k_are_bounded(client: TestClient) -> None:
    for params in ({"q": "x" * (MAX_QUERY_CHARS + 1)}, {"q": QUERY, "k": MAX_K + 1}, {"q": QUERY, "k": 0},
                   {"q": QUERY, "k": "ten"}, {"q": QUERY, "k": "-1"}, {"q": QUERY, "k": "1" * 40}, {},
                   {"q": "   "}, {"q": QUERY, "k": "５"}):
        response = client.get("/api/search", params=params)
        assert response.status_code == 422, params
        assert list(response.json()) == ["error"] and "\n" not in response.json()["error"]
    assert client.get("/api/similar/x", params={"k": 10_000}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * MAX_QUERY_CHARS, "k": MAX_K}).status_code == 200


def test_token_is_required_when_set(service: Service) -> None:
    token = "s3cret/+ token"
    client = TestClient(create_app(service, token=token))
    for path in ("/", "/static/app.js", "/api/health", "/api/search?q=red", "/media/video/x", "/nothing"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert "token" in refused.json()["error"]
    assert client.get("/api/health", params={"token": "wrong"}).status_code == 401
    assert client.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/api/health", headers={"X-Ssbctl-Token": token}).status_code == 200
    assert client.get("/api/health", params={"token": token}).status_code == 200
    page = client.get("/", params={"token": token})
    assert page.status_code == 200 and "/static/app.js?token=s3cret%2F%2B%20token" in page.text
    assert client.get("/static/app.js?token=s3cret%2F%2B%20token").status_code == 200


def test_host_header_is_checked_on_loopback(service: Service) -> None:
    client = TestClient(create_app(service, hosts=LOOPBACK_NAMES), base_url="http://127.0.0.1:8000")
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
    rebound = client.get("/api/health", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 400 and "Host" in rebound.json()["error"]


BLOCK_STARLETTE = """
import sys
class Hide:  # as on a machine without ssbctl[serve]
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"starlette", "uvicorn"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
from ssbctl.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_without_the_extra_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_STARLETTE, "serve", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: ssbctl serve needs starlette and uvicorn: pip install 'ssbctl[serve]'\n"


def start_serve(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``ssbctl serve ARGS --port 0`` and wait for the URL it prints; the stderr lines before it."""
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "serve", *args, "--port", "0"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("serving "):
            url = line.split(" at ", 1)[1].split(" ", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained: a full pipe would block it
            return proc, url, lines
    proc.wait(timeout=30)
    raise AssertionError(f"ssbctl serve exited {proc.returncode}: {''.join(lines)}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_command_on_all_interfaces_warns_and_answers(served) -> None:
    import urllib.request

    proc, url, lines = start_serve([str(served[1]), "--host", "0.0.0.0", "--token", "tok"])
    try:
        assert any(line.startswith("warning: --host 0.0.0.0 serves your videos") for line in lines), lines
        port = int(url.split(":")[2].split("/")[0])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search?q=red&k=2",
                                         headers={"Authorization": "Bearer tok"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())) == 2
    finally:
        code = stop(proc)
    assert code in (0, 143)


def test_serve_refuses_a_bad_port_and_a_missing_index(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "none"), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "no index at" in capsys.readouterr().err
