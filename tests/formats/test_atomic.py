"""Writes that survive a crash: killed at every file-system step of an overwrite, the destination
always holds a whole model (the old or the new one), and the next write leaves no temporaries
behind (issue 10)."""

import os

import pytest
import torch

import lowbit
import lowbit.formats.atomic as atomic
import lowbit.formats.lowbit_format as folder_format
from tests.fixtures_models import tiny_mlp

STEPS = [(os, "replace"), (os, "rename"), (os, "chmod"), (atomic.shutil, "rmtree"), (atomic, "exchange"),
         (folder_format, "save_file")]


def _models():
    model = tiny_mlp().eval()
    old = lowbit.quantize(model, "w8", progress=False)
    new = lowbit.quantize(model, "w8a8-dynamic", progress=False)
    return old, new


def _crash_at(step: int, write) -> int:
    """Run `write` in a forked child that dies (os._exit, no clean-up at all) at its `step`-th
    file-system call; returns how many calls it made when it did not die."""
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        calls = [0]

        def wrap(function):
            def crashing(*args, **kwargs):
                calls[0] += 1
                if calls[0] == step:
                    os._exit(9)
                return function(*args, **kwargs)
            return crashing

        for owner, name in STEPS:
            setattr(owner, name, wrap(getattr(owner, name)))
        write()
        os.write(write_end, str(calls[0]).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    made = os.read(read, 64).decode()
    os.close(read)
    return int(made) if os.waitstatus_to_exitcode(status) == 0 else -1


def _scheme(folder) -> str:
    return lowbit.load(folder, skeleton=tiny_mlp).lowbit_manifest["recipe"]["scheme"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_at_every_step_of_an_overwrite_the_destination_is_whole(tmp_path):
    old, new = _models()
    target = tmp_path / "model"
    lowbit.save(old, target)
    total = _crash_at(10**9, lambda: lowbit.save(new, tmp_path / "probe", overwrite=True))
    assert total > 3
    for step in range(1, total + 2):
        lowbit.save(old, target, overwrite=True)
        _crash_at(step, lambda: lowbit.save(new, target, overwrite=True))
        atomic.recover(target)  # what the next write does first
        assert _scheme(target) in ("weight_only", "dynamic"), f"crash at step {step}"
        lowbit.save(new, target, overwrite=True)
        assert _scheme(target) == "dynamic"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"crash at step {step} left {leftovers}"


def test_without_renameat2_a_crash_between_the_two_renames_is_undone_by_the_next_write(tmp_path, monkeypatch):
    old, new = _models()
    target = tmp_path / "model"
    lowbit.save(old, target)
    os.replace(target, tmp_path / ".model.old")  # the moment after the old folder was moved aside
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    atomic.recover(target)
    assert _scheme(target) == "weight_only"
    lowbit.save(new, target, overwrite=True)
    assert _scheme(target) == "dynamic" and not (tmp_path / ".model.old").exists()


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    old, _ = _models()
    dead = tmp_path / ".model.999999999.abc.partial"
    live = tmp_path / f".model.{os.getpid()}.abc.partial"
    dead.mkdir()
    live.mkdir()
    lowbit.save(old, tmp_path / "model")
    assert not dead.exists() and live.exists()


def test_saved_folders_get_ordinary_permissions(tmp_path):
    old, _ = _models()
    umask = os.umask(0o022)
    try:
        folder = lowbit.save(old, tmp_path / "model")
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in folder.iterdir())


def test_a_write_that_raises_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    old, new = _models()
    target = tmp_path / "model"
    lowbit.save(old, target)

    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(folder_format, "save_file", broken)
    with pytest.raises(torch.OutOfMemoryError):
        lowbit.save(new, target, overwrite=True)
    assert _scheme(target) == "weight_only"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
