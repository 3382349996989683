"""Every Python snippet of the README runs as written, each alone in a fresh interpreter and an
empty folder, so the README cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i + 1}" for i in range(len(SNIPPETS))])
def test_a_readme_snippet_runs_as_written(snippet, tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": str(README.parent)}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{snippet}\n---\n{result.stderr[-3000:]}"
