"""Atomic writes: a saved model or report is either wholly there or not there at all.

Everything is written into a temporary sibling (`.NAME.PID.partial`) and renamed into place. An
existing folder is replaced with one `renameat2(RENAME_EXCHANGE)` call where Linux offers it, so
there is no moment at which the destination is absent; elsewhere the old folder is moved aside
first, and a run that finds it moved aside (a crash in between) puts it back. Temporaries left by
runs that crashed are removed by the next write to the same destination.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import FormatError

RENAME_EXCHANGE = 2
AT_FDCWD = -100
FOLDER_MODE, FILE_MODE = 0o755, 0o644


def _renameat2() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step; False where the platform or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    result = function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    return result == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _backup(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: Path) -> None:
    """Undo what a crashed write left: put back a folder moved aside, remove dead temporaries."""
    backup = _backup(target)
    if backup.exists() and not target.exists():
        os.replace(backup, target)
    elif backup.exists():
        shutil.rmtree(backup, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        pid = stale.name.removeprefix(f".{target.name}.").removesuffix(".partial").split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _set_permissions(staging: Path) -> None:
    """Ordinary permissions (folders 0755, files 0644, less the umask), not a temporary
    directory's 0700: a service running as another user must be able to read the model."""
    umask = _umask()
    for root, _, files in os.walk(staging):
        os.chmod(root, FOLDER_MODE & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE & ~umask)


def _check_destination(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FormatError(f"{target} already exists; choose another path or pass overwrite=True")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FormatError(f"cannot create {target.parent}: {error.strerror}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise FormatError(f"{target.parent} is not writable")


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `path` in one step, on any failure
    it is removed and `path` is untouched."""
    target = Path(path)
    recover(target)
    _check_destination(target, overwrite)
    if target.exists() and not target.is_dir():
        raise FormatError(f"{target} exists and is not a folder; lowbit will not replace it with one")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial",
                                        dir=target.parent))
    except OSError as error:
        raise FormatError(f"cannot write in {target.parent}: {error.strerror}") from None
    try:
        yield staging
        _set_permissions(staging)
        _move_into_place(staging, target)
    except OSError as error:
        raise _write_error(target, error) from None
    finally:
        if staging.exists():
            _remove(staging)


def _write_error(target: Path, error: OSError) -> FormatError:
    return FormatError(f"writing {target} failed: {error.strerror or error}; nothing was written")


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange(staging, target):  # staging now holds the old folder, removed by the caller
        return
    backup = _backup(target)
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)  # put the old folder back; a hard crash here is undone by `recover`
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path` in one rename."""
    target = Path(path)
    recover(target)
    _check_destination(target, overwrite)
    if target.is_dir():
        raise FormatError(f"{target} is a folder; lowbit writes a file there only in place of a file")
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield staging
        os.chmod(staging, FILE_MODE & ~_umask())
        os.replace(staging, target)
    except OSError as error:
        raise _write_error(target, error) from None
    finally:
        staging.unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write a report (JSON, HTML, Markdown) atomically."""
    with atomic_file(path, overwrite) as staging:
        staging.write_text(text)
    return Path(path)
