"""Opt-in (`make test-slow`): the bench scripts run end to end and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_minilm_bench_measures_every_contender():
    subprocess.run([sys.executable, "-m", "bench.minilm", "--runs", "5"], check=True, cwd=ROOT,
                   timeout=1800)
    rows = {row["model"]: row for row in json.loads((ROOT / "bench/results/minilm.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "lowbit w8a8-dynamic", "lowbit w8a8-dynamic ort", "torch.ao dynamic",
                         "ort fp32", "ort int8", "ort int8, unfused norm", "lowbit w8 ort",
                         "lowbit w8 ort int8-act", "lowbit w4 ort", "lowbit w4 ort int8-act",
                         "lowbit w4-gptq", "lowbit w4-gptq ort int8-act"}
    assert rows["lowbit w8a8-dynamic"]["cosine"] >= 0.995 and rows["lowbit w8 ort"]["cosine"] >= 0.995
    assert all(row["b1_ms"] > 0 and row["size_mb"] > 0 for row in rows.values())
