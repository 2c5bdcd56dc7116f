"""The documentation runs: every ```python and ```ipython block of README.md and docs/*.md,
and every ```bash block of docs/*.md, so it never rots.

Each file's blocks run in order in one shared namespace, in a fresh Python process (the
blocks start engines and servers of their own, and functions they define live in
``__main__``, as in a notebook). An ```ipython block is one cell, run by a real IPython
``InteractiveShell`` on that namespace (magics included); a ```bash block runs in
``bash -euo pipefail`` (in the test's temporary directory, with ``REDISENGINES_HOME`` there
and this Python's scripts first on PATH; shell variables do not outlive a block, so the docs
keep settings in files they ``source``). The process calls
``redisengines.shutdown()`` at the end, whatever happened. A block preceded by a
``<!-- no-test -->`` line is skipped: keep that for blocks that cannot run here (a remote
host, a transcript). One preceded by ``<!-- error -->`` must fail (an ipython cell whose
error the text shows).

Tracebacks name the Markdown file and the line in it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
ERROR = "<!-- error -->"
RUN_LIMIT = 50.0  # seconds per file; the blocks are written to take a few

# Lines that a file's blocks print only from an ``except`` clause: seeing them proves that
# the error the text promises was raised (a missing exception would pass silently).
PRINTED = {
    "docs/operator-guide.md": [
        "0 busy execute queued 2",
        "[stdout:1] line 2",
        "engine 0 is busy running execute",
        "the long one: KeyboardInterrupt",
        "queued ones cancelled: True",
        "dropped: 3",
        "cancelled: 3 still running: True",
        "[0, 1]",
    ],
    "docs/multi-machine.md": [
        "-rw-------",
        "Cluster 'lab' is running: 2 engines",
        "2 engines: ['idle']",
        "2 engines answered",
        "refused by engine 0",
        "died; started: True",
    ],
    "docs/tutorial-interactive.md": [
        "[stdout:1] engine 1 summed 499500",
        "[stdout:0] step 2",
        "[stdout:1] done in the background",
        "[0:execute]: ZeroDivisionError",
        "engine 0 raised ZeroDivisionError",
        "KeyboardInterrupt on engine 0",
        "ran longer than its time limit of 0.5 s on engine 0",
        "[stdout:1] still here: 42",
        "6/6",
    ],
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

_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>python|py|ipython|bash)[ \t]*$")
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")

# Runs in the child: blocks as JSON on stdin; each compiled under its file name, padded so
# that line numbers are the Markdown file's (tracebacks then show the doc's own lines).
RUNNER = r"""
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
shell = None
try:
    for block in blocks:
        print(f"--- {block['path']}:{block['line']}", flush=True)
        if block["lang"] == "bash":
            sys.stdout.flush()
            import subprocess
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
            if done.returncode != 0:
                raise AssertionError(f"{block['path']}:{block['line']}: bash exited with "
                                     f"{done.returncode}")
            continue
        if block["lang"] == "ipython":
            if shell is None:
                from IPython.core.interactiveshell import InteractiveShell
                shell = InteractiveShell.instance(user_ns=namespace)
            result = shell.run_cell(block["code"])
            sys.stdout.flush()
            failed = result.error_before_exec or result.error_in_exec
            if block["error"] and failed is None:
                raise AssertionError(f"{block['path']}:{block['line']}: the cell did not fail")
            if not block["error"] and failed is not None:
                raise AssertionError(f"{block['path']}:{block['line']}: {failed!r}")
            continue
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
    lang: str = "python"  # or "ipython": one cell for an InteractiveShell
    error: bool = False  # it must fail (<!-- error -->)


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
            raise AssertionError(f"{rel}:{i + 1}: unclosed ```{match['lang']} block")
        code = "\n".join(line[indent:] for line in lines[start:end]) + "\n"
        lang = "python" if match["lang"] == "py" else match["lang"]
        block = Block(rel, start + 1, code, lang, error=previous == ERROR)
        if lang == "bash" and not rel.startswith("docs/"):
            pass  # (the README's shell lines are run by tests of their own)
        else:
            (skipped if previous == NO_TEST else run).append(block)
        previous = ""
        i = end + 1
    return run, skipped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_runs(doc: Path, tmp_path: Path) -> None:
    blocks, _ = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python blocks to run")
    env = {**os.environ, "REDISENGINES_HOME": str(tmp_path / "home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER], input=json.dumps([asdict(b) for b in blocks]),
            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_LIMIT, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{doc.name} did not finish within {RUN_LIMIT} s:\n"
                             f"{_text(exc.stdout)}\n{_text(exc.stderr)}") from None
    finally:
        _clean_up(tmp_path, env)
    assert proc.returncode == 0, f"{doc.name} failed:\n{proc.stdout}\n{proc.stderr}"
    rel = str(doc.relative_to(ROOT))
    missing = [text for text in PRINTED.get(rel, []) if text not in proc.stdout]
    assert not missing, f"{rel} did not print {missing}:\n{proc.stdout}"


def _clean_up(directory: Path, env: dict[str, str]) -> None:
    """Stop what a failed doc left running: clusters of ``redisengines start`` (their
    connection files) and servers that wrote a pid file."""
    for info in (directory / "home").glob("*.json"):
        subprocess.run([sys.executable, "-m", "redisengines", "stop", "--cluster", info.stem],
                       env=env, capture_output=True, timeout=30)
    for pidfile in directory.rglob("*.pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


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
    interactive, skipped = python_blocks(ROOT / "docs" / "tutorial-interactive.md")
    assert sum(b.lang == "ipython" for b in interactive) >= 15 and not skipped
    for name in ("multi-machine.md", "operator-guide.md"):
        blocks, _ = python_blocks(ROOT / "docs" / name)
        assert {b.lang for b in blocks} == {"python", "bash"}, name


def test_block_extraction(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    text = ("# t\n\n```python\na = 1\n```\n\n```bash\necho no\n```\n\n"
            f"{NO_TEST}\n\n```python\nraise SystemExit('must not run')\n```\n\n"
            "1. a list item\n\n   ```python\n   b = a + 1\n   ```\n")
    doc.write_text(text, encoding="utf-8")
    run, skipped = python_blocks(doc)
    assert [(b.line, b.code) for b in run] == [(4, "a = 1\n"), (20, "b = a + 1\n")]
    assert [b.code for b in skipped] == ["raise SystemExit('must not run')\n"]
    doc.write_text(f"```ipython\n%time x = 1\n```\n\n{ERROR}\n```ipython\n1/0\n```\n")
    run, _ = python_blocks(doc)
    assert [(b.lang, b.error, b.code) for b in run] == [("ipython", False, "%time x = 1\n"),
                                                        ("ipython", True, "1/0\n")]
