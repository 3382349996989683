"""bench.common.print_table: a result table reads at 80 columns, every value in it."""

from bench.common import print_table

COLUMNS = [("model", "model"), ("method", "method"), ("unused", "never filled")] + [
    (f"figure {index}", f"a long figure name {index}") for index in range(8)]


def _printed(capsys, rows) -> list[str]:
    print_table("measured now", rows, COLUMNS)
    return capsys.readouterr().out.splitlines()


def test_a_table_wider_than_80_columns_prints_one_block_per_row(capsys):
    rows = [{"model": "EfficientNet-Lite0", "method": "post-training",
             **{f"figure {index}": 0.1234 * (index + 1) for index in range(8)}},
            {"model": "MiniLM", "method": "QAT + distillation", "figure 3": 0.5}]
    lines = _printed(capsys, rows)
    assert max(len(line) for line in lines) <= 80
    assert "EfficientNet-Lite0 · post-training" in lines and "MiniLM · QAT + distillation" in lines
    text = "\n".join(lines)
    assert all(f"a long figure name {index} {0.1234 * (index + 1):.4g}" in text for index in range(8))
    assert "never filled" not in text


def test_a_narrow_table_stays_a_table_without_its_empty_columns(capsys):
    lines = _printed(capsys, [{"model": "MiniLM", "method": "w8", "figure 0": 0.99}])
    assert any("┃" in line and "a long figure name 0" in line for line in lines)
    assert "never filled" not in "\n".join(lines) and max(len(line) for line in lines) <= 80
