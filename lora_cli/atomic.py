"""Write files and folders so that a killed process never leaves a half-written one behind.

Everything is written under a temporary name beside its destination (same filesystem) and
renamed into place only once complete and flushed. A reader therefore sees either the old
version or the new one. A full disk (ENOSPC) is turned into a clear error and the temporary
is removed, so the previous version stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lora_cli.errors import LoraCliError

TMP_PREFIX = ".tmp-"


def disk_error(exc: OSError, what: Path | str) -> LoraCliError:
    """Translate an OSError raised while writing into a message a user can act on."""
    if exc.errno == errno.ENOSPC:
        return LoraCliError(
            f"No space left on the device while writing {what}.",
            "Nothing was replaced: the previous version (if any) is intact. Free some disk space and run the command again.",
        )
    return LoraCliError(f"Could not write {what}: {exc.strerror or exc}.")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary file path beside `dest`; rename it onto `dest` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; a normal file respects the umask
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise disk_error(exc, dest) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(dest: Path | str, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(dest: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; rename it onto `dest` if the block succeeds.

    With `replace`, an existing `dest` is moved aside first and removed only after the new
    folder is in place; without it, an existing `dest` is an error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        old = None
        if dest.exists():
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists", str(dest))
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{dest.name}.", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, FileExistsError):
            raise
        raise disk_error(exc, dest) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete leftovers of killed writers in `folder` (names starting with TMP_PREFIX)."""
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed
