"""The README's Python API example runs as written (models built from tensors, no run folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_api_example() -> str:
    """The first ``python`` code block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md's Python API section has no python code block"
    return match.group(1)


@pytest.mark.usefixtures("single_thread")
def test_readme_python_api_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(python_api_example(), str(README), "exec"), {"__name__": "readme_example"})  # noqa: S102 (our own README)
    assert capsys.readouterr().out.startswith("top 5: [")
