"""Every example users are shown runs as written (issue 12, "Discoverable").

The examples are read, not copied: each command's ``--help`` epilog (the lines that start with
``ssbctl``) and every ```` ```bash ````, ```` ```sh ```` or ```` ```console ```` block of README.md.
Each source runs in order in a fresh folder, with ``$SSBCTL_HOME`` and ``$HOME`` in temp folders,
after what a new user has done first: a (tiny) ``ssbctl demo``. Sources that do not train
``runs/shapes`` themselves start with it (a one-epoch ``ssbctl train --recipe shapes``) and with
the index ``my-index`` that ``ssbctl index --help`` builds from it.

What cannot run here is skipped, each with its reason, in two explicit ways:
- in README.md, a ``<!-- no-test: REASON -->`` comment right before a code block skips the block;
- :data:`SKIP` below: a pattern per kind of line (network, real datasets, the slow full demo).
The files examples assume the user has (``clip.mp4``, ``queries.txt``, ``~/Videos``...) are made
from the demo's clips by :func:`_user_files`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from damage import cli

README = Path(__file__).resolve().parents[1] / "README.md"
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")

# (pattern searched in the example line, why it is not run here). Keep each reason specific.
SKIP: list[tuple[str, str]] = [
    (r"^bash scripts/", "a script of the git checkout: creates .venv and installs packages (network)"),
    (r"\bpip install\b|python3? -m venv", "installs packages (network)"),
    (r"\b(msrvtt|msvd|vatex|activitynet|didemo)\b", "needs a real dataset (its videos, or a download)"),
    (r"^ssbctl prepare shapes\b", "generates 1,000 clips (minutes); the test's tiny demo wrote the same store"),
    (r"^ssbctl demo\b", "the full demo takes minutes; the test ran `ssbctl demo --num-videos 30` instead"),
    (r"--faiss|--backend faiss", "an approximate faiss index needs more videos than the test's tiny demo has"),
    (r"^ssbctl serve\b", "starts a server that runs until stopped (tests/test_serve*.py start it and use it)"),
    (r"--nproc 2\b", "a 2-process torchrun launch (over a minute here); tests/test_recipes_distributed.py and "
                     "tests/test_distributed.py run `train --nproc 2` and torchrun"),
]
TINY_DEMO = ["demo", "--num-videos", "30", "--set", "train.epochs=1", "--set", "train.batch_size=16"]


@dataclass
class Example:
    source: str  # "README.md:123" or "ssbctl train --help"
    line: str
    skip: str | None = None


def _skip_reason(line: str) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, line):
            return reason
    if re.search(r"\|\s*jq\b", line) and shutil.which("jq") is None:
        return "pipes into jq, which is not installed here"
    return None


def _command_lines(block: list[str], console: bool) -> list[str]:
    """The commands of a code block: continuation lines joined, comments and blanks dropped;
    in a console block only the ``$ `` lines."""
    lines, pending = [], ""
    for raw in block:
        if console and not pending:
            if not raw.startswith("$ "):
                continue  # output shown in the block
            raw = raw[2:]
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def readme_examples(text: str) -> list[Example]:
    """The command lines of README's shell code blocks, in order, with their skip reasons."""
    examples: list[Example] = []
    lines = text.splitlines()
    i, marker = 0, None
    while i < len(lines):
        found = NO_TEST.search(lines[i])
        if found:
            marker = found.group(1)
        fence = FENCE.match(lines[i].strip())
        if fence:
            start, block = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                block.append(lines[i])
                i += 1
            for line in _command_lines(block, fence.group(1) == "console"):
                reason = f"README marker: {marker}" if marker else _skip_reason(line)
                examples.append(Example(f"README.md:{start}", line, reason))
            marker = None
        elif lines[i].strip() and not found:
            marker = None  # a marker applies to the block right after it only
        i += 1
    return examples


def help_examples() -> dict[str, list[Example]]:
    """Every command's epilog examples, by command path (``train``, ``recipes``...), plus the
    ``--help`` call itself (which must exit 0)."""
    import typer.main

    from ssbctl.cli.app import app

    found: dict[str, list[Example]] = {}

    def walk(command: object, path: list[str]) -> None:
        source = "ssbctl " + " ".join([*path, "--help"])
        lines = [line.strip() for line in (getattr(command, "epilog", None) or "").splitlines()]
        examples = [Example(source, " ".join(["ssbctl", *path, "--help"]))]
        for line in lines:
            if line.startswith("ssbctl "):
                examples.append(Example(source, line, _skip_reason(line)))
        found[" ".join(path) or "ssbctl"] = examples
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


# ---------------------------------------------------------------- running them


def _argv(line: str) -> list[str] | None:
    """The arguments of a plain ``ssbctl ...`` line (run in-process), or None when it needs a
    shell (a pipe, ``&&``, a redirection, a variable)."""
    words = shlex.split(line, comments=True)
    if not words or words[0] != "ssbctl":
        return None
    if any(ch in line.split("#")[0] for ch in "|&;<>$`"):
        return None
    return [os.path.expanduser(w) for w in words[1:]]


def run_example(line: str, cwd: Path) -> tuple[int, str]:
    """Run one example in ``cwd``: exit code and its stderr (and stdout for a shell line)."""
    argv = _argv(line)
    if argv is not None:
        previous = os.getcwd()
        os.chdir(cwd)
        try:
            result = cli(argv, timeout=600)
        finally:
            os.chdir(previous)
        return result.code, result.err
    bin_dir = str(Path(sys.executable).parent)  # the ssbctl console script of this environment
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout[-2000:] + proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's machine after ``ssbctl demo`` (tiny): $SSBCTL_HOME, $HOME with ~/Videos, a base
    folder with the files examples name, and a copy of it with a one-epoch ``runs/shapes`` and
    ``my-index``."""
    root = tmp_path_factory.mktemp("examples")
    home, user = root / "ssbctl-home", root / "home"
    user.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("SSBCTL_HOME", str(home))
    patch.setenv("HOME", str(user))
    try:
        result = cli(TINY_DEMO, timeout=900)
        assert result.code == 0, result.err
        base = root / "base"
        _user_files(home / "demo" / "raw", base, user)
        with_run = root / "with-run"
        shutil.copytree(base, with_run)
        for line in ("ssbctl train --recipe shapes --set train.epochs=1",
                     "ssbctl index runs/shapes --data shapes-pixels --split test --out my-index"):
            code, err = run_example(line, with_run)
            assert code == 0, err
    finally:
        patch.undo()
    return {"home": home, "user": user, "base": base, "with_run": with_run}


def _user_files(raw: Path, base: Path, user: Path) -> None:
    """What the examples assume the user has, made from the demo's clips: clip.mp4, queries.txt,
    captions.txt and bank.txt (caption lists), my/captions.jsonl (a custom dataset), ~/Videos and ~/Movies."""
    rows = [json.loads(line) for line in (raw / "captions.jsonl").read_text().splitlines()]
    clips = sorted({r["video"] for r in rows})
    base.mkdir()
    shutil.copy(raw / clips[0], base / "clip.mp4")
    (base / "queries.txt").write_text("a red circle moves to the left\na big blue square spins\n")
    captions = "".join(r["caption"] + "\n" for r in rows[:12])
    (base / "captions.txt").write_text(captions)
    (base / "bank.txt").write_text(captions)
    (base / "my" / "videos").mkdir(parents=True)
    custom = []
    for split, clip in zip(["train"] * 6 + ["test"] * 2, clips[:8]):
        shutil.copy(raw / clip, base / "my" / "videos" / Path(clip).name)
        custom += [{"video": f"videos/{Path(clip).name}", "caption": r["caption"], "split": split}
                   for r in rows if r["video"] == clip]
    (base / "my" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in custom))
    for folder, chosen in (("Videos", clips[:4]), ("Movies", clips[4:6])):
        (user / folder).mkdir()
        for clip in chosen:
            shutil.copy(raw / clip, user / folder / Path(clip).name)


def _run_source(examples: list[Example], world: dict[str, Path], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one source's examples in order in a fresh folder; report every failure at once."""
    monkeypatch.setenv("SSBCTL_HOME", str(world["home"]))
    monkeypatch.setenv("HOME", str(world["user"]))
    trains_own = any(re.match(r"ssbctl train --recipe shapes(?!.*--out)", e.line) for e in examples if not e.skip)
    cwd = tmp_path / "cwd"
    shutil.copytree(world["base"] if trains_own else world["with_run"], cwd)
    failures, ran = [], 0
    for example in examples:
        if example.skip:
            continue
        code, err = run_example(example.line, cwd)
        ran += 1
        if code != 0:
            failures.append(f"{example.source}: `{example.line}` exited {code}:\n{err[-1500:]}")
    assert ran, "no example of this source ran"
    assert not failures, "\n\n".join(failures)


def test_readme_examples_run_as_written(world: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    examples = readme_examples(README.read_text(encoding="utf-8"))
    assert len(examples) >= 10, "README's examples were not found"
    _run_source(examples, world, tmp_path, monkeypatch)


@pytest.mark.parametrize("command", sorted(help_examples()))
def test_help_examples_run_as_written(command: str, world: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _run_source(help_examples()[command], world, tmp_path, monkeypatch)


def test_every_skip_has_a_reason_and_markers_are_read() -> None:
    """The skip markers work as documented: a marker skips the next block only, with its reason."""
    text = "\n".join(["<!-- no-test: needs a GPU -->", "```bash", "ssbctl train --recipe shapes", "```", "",
                      "```console", "$ ssbctl runs --json", "[]", "$ ssbctl recipes \\", "  --json", "```"])
    examples = readme_examples(text)
    assert [(e.line, e.skip) for e in examples] == [("ssbctl train --recipe shapes", "README marker: needs a GPU"),
                                                   ("ssbctl runs --json", None), ("ssbctl recipes --json", None)]
    assert all(reason.strip() for _, reason in SKIP)
