"""A seeded, bounded run of the file fuzzer (bench/fuzz_files.py): mutated files with every
checksum recomputed must load or be refused with a LowbitError, never run code, read outside
their folder, crash, hang or fail untyped, at load or at their first call. The long run
(`python -m bench.fuzz_files --cases 10000`) is documented in bench/README.md."""

from bench.fuzz_files import run


def test_three_hundred_mutated_files_per_format_are_each_loaded_or_refused_cleanly():
    result = run(cases=600, seed_value=20261202, timeout=10.0)
    assert result["cases"] == 600
    assert result["failures"] == {}, result["failures"]
    assert result["outcomes"].get("ok", 0) > 0 and result["outcomes"].get("refused", 0) > 0
    assert result["per_format"] == {"sklearn": 300, "torch": 300}
