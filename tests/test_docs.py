"""The documentation's code runs as written and prints what the page says it prints.

A fenced ``python`` block in ``docs/**/*.md`` runs when it contains ``trio.run(`` or follows a
``<!-- run -->`` line; ``<!-- no-run -->`` before a block keeps it out (a fragment, or code
that needs a server). A ``text`` block after a ``<!-- output -->`` line that follows a run
block is that block's expected standard output. Each block runs on its own, in a fresh
namespace, with ``trio.run`` on a virtual clock (``MockClock(autojump_threshold=0)``), so timed
examples cost no real time.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(
    r"(?:^<!-- (?P<marker>run|no-run|output) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


@dataclass
class Snippet:
    page: str
    line: int
    code: str
    output: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    return extract(page.read_text(encoding="utf-8"), str(page.relative_to(DOCS)))


def extract(text: str, name: str) -> list[Snippet]:
    """The run blocks of a page, with their first line and expected output."""
    found: list[Snippet] = []
    previous_ran = False
    for match in FENCE.finditer(text):
        marker, lang, code = match["marker"], match["lang"], match["code"]
        if marker == "output":
            assert lang == "text", f"{name}: an output block must be ```text"
            assert previous_ran, f"{name}: an output block must follow a run block"
            found[-1].output = code
            previous_ran = False
            continue
        runs = lang == "python" and marker != "no-run" and (marker == "run" or "trio.run(" in code)
        if runs:
            line = text.count("\n", 0, match.start("code")) + 1
            found.append(Snippet(name, line, code, None))
        previous_ran = runs
    return found


PAGES = sorted(DOCS.rglob("*.md"))
SNIPPETS = [snippet for page in PAGES for snippet in snippets(page)]


def run_on_virtual_clock(real_run: Any, async_fn: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("clock", trio.testing.MockClock(autojump_threshold=0))
    return real_run(async_fn, *args, **kwargs)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_snippet_runs(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio, "run", partial(run_on_virtual_clock, trio.run))
    # the line numbers of a failure point into the page
    code = compile("\n" * (snippet.line - 1) + snippet.code, str(DOCS / snippet.page), "exec")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(code, {"__name__": "__docs__"})
    if snippet.output is not None:
        assert output.getvalue() == snippet.output


def test_the_pages_that_teach_have_running_code() -> None:
    pages = {snippet.page for snippet in SNIPPETS}
    assert {"index.md", "tutorial.md", "semantics.md", "how-to/testing.md"} <= pages


def test_the_extraction_finds_markers_and_outputs() -> None:
    page = (
        "<!-- run -->\n```python\nprint(1)\n```\n\n<!-- output -->\n```text\n1\n```\n\n"
        "```python\ntrio.run(main)\n```\n\n<!-- no-run -->\n```python\ntrio.run(main)\n```\n"
        "```python\nx = 1\n```\n```sh\ntrio.run(\n```\n"
    )
    found = [(s.line, s.code, s.output) for s in extract(page, "example.md")]
    assert found == [(3, "print(1)\n", "1\n"), (12, "trio.run(main)\n", None)]


def test_the_benchmark_table_is_the_readme_one() -> None:
    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    performance = readme[readme.index("## Performance") :]
    performance = performance[: performance.index("\n## ")]
    rows = table(performance)
    assert len(rows) > 5
    assert table((DOCS / "performance.md").read_text(encoding="utf-8")) == rows
