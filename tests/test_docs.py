"""The documentation runs: every ```python block of README.md and docs/*.md, so it never rots.

Each file's blocks run in order in one shared namespace, in a fresh Python process (the
blocks start engines and servers of their own, and functions they define live in
``__main__``, as in a notebook). The process calls ``redisengines.shutdown()`` at the end,
whatever happened. A block preceded by a ``<!-- no-test -->`` line is skipped: keep that
for blocks that cannot run here (a remote host, say).

Tracebacks name the Markdown file and the line in it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
RUN_LIMIT = 50.0  # seconds per file; the blocks are written to take a few

# Lines that a file's blocks print only from an ``except`` clause: seeing them proves that
# the error the text promises was raised (a missing exception would pass silently).
PRINTED = {
    "docs/tutorial-actors.md": [
        "not yet",
        "the upstream error, passed on",
        "was killed",
        "the name is free again",
        "cancelled before it started",
        "did not start within 0.2 s",
        "no default client until the next init()",
    ],
}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[ \t]*$")
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")

# Runs in the child: blocks as JSON on stdin; each compiled under its file name, padded so
# that line numbers are the Markdown file's (tracebacks then show the doc's own lines).
RUNNER = r"""
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    for block in blocks:
        print(f"--- {block['path']}:{block['line']}", flush=True)
        source = "\n" * (block["line"] - 1) + block["code"]
        exec(compile(source, block["path"], "exec"), namespace)
finally:
    import redisengines
    redisengines.shutdown()
"""


@dataclass(frozen=True)
class Block:
    path: str  # the file, relative to the repository root
    line: int  # line of the block's first line of code (1-based)
    code: str


def python_blocks(path: Path) -> tuple[list[Block], list[Block]]:
    """``(blocks to run, blocks marked no-test)`` of a Markdown file, in order."""
    run: list[Block] = []
    skipped: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    previous = ""  # last non-blank line before the current one
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent = len(match["indent"])
        start = i + 1
        end = start
        while end < len(lines) and not _CLOSE.match(lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{rel}:{i + 1}: unclosed ```python block")
        code = "\n".join(line[indent:] for line in lines[start:end]) + "\n"
        (skipped if previous == NO_TEST else run).append(Block(rel, start + 1, code))
        previous = ""
        i = end + 1
    return run, skipped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_runs(doc: Path, tmp_path: Path) -> None:
    blocks, _ = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python blocks to run")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER], input=json.dumps([asdict(b) for b in blocks]),
            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_LIMIT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{doc.name} did not finish within {RUN_LIMIT} s:\n"
                             f"{_text(exc.stdout)}\n{_text(exc.stderr)}") from None
    assert proc.returncode == 0, f"{doc.name} failed:\n{proc.stdout}\n{proc.stderr}"
    rel = str(doc.relative_to(ROOT))
    missing = [text for text in PRINTED.get(rel, []) if text not in proc.stdout]
    assert not missing, f"{rel} did not print {missing}:\n{proc.stdout}"


def _text(out: str | bytes | None) -> str:
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""


def test_the_docs_have_blocks_to_run() -> None:
    """The Quickstart, the Ray section and the tutorial are all run (nothing silently lost)."""
    readme, _ = python_blocks(ROOT / "README.md")
    joined = "\n".join(b.code for b in readme)
    assert "redisengines.Cluster(n=2)" in joined  # the Quickstart
    assert "redisengines.init(" in joined  # Remote functions and actors (for Ray users)
    tutorial, skipped = python_blocks(ROOT / "docs" / "tutorial-actors.md")
    assert len(tutorial) >= 10 and not skipped


def test_block_extraction(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    text = ("# t\n\n```python\na = 1\n```\n\n```bash\necho no\n```\n\n"
            f"{NO_TEST}\n\n```python\nraise SystemExit('must not run')\n```\n\n"
            "1. a list item\n\n   ```python\n   b = a + 1\n   ```\n")
    doc.write_text(text, encoding="utf-8")
    run, skipped = python_blocks(doc)
    assert [(b.line, b.code) for b in run] == [(4, "a = 1\n"), (20, "b = a + 1\n")]
    assert [b.code for b in skipped] == ["raise SystemExit('must not run')\n"]
