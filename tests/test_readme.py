"""The README's quick start runs as written (on the virtual clock) and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import trio
import trio.testing

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the quick start has no python block"
    return match.group(1)


def test_quick_start_batches_ten_thousand_lookups_into_a_hundred_calls() -> None:
    code = quick_start()
    assert code.rstrip().endswith("trio.run(main)")
    namespace: dict[str, Any] = {"__name__": "quick_start"}
    exec(compile(code.rstrip().removesuffix("trio.run(main)"), str(README), "exec"), namespace)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        trio.run(namespace["main"], clock=trio.testing.MockClock(autojump_threshold=0))
    assert float(output.getvalue()) == 100.0
