"""Write files and folders so that a killed process never leaves a half-written one behind.

Everything is written under a temporary name beside its destination (same filesystem) and
renamed into place only once complete and flushed. A reader therefore sees either the old
version or the new one. A full disk (ENOSPC), however the library doing the writing reports
it, is turned into a clear error and the temporary is removed, so the previous version stays
intact. Temporaries carry their writer's host and pid, so leftovers of killed writers can be
told from those of writers still at work and cleaned up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from lora_cli.errors import LoraCliError
from lora_cli.faults import point as fault_point

TMP_PREFIX = ".tmp-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull")
OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
SHORT_WRITE = re.compile(r"(\d+) requested and \d+ written")
SHORT_WRITE_HINT = ("The device may be full, or the file larger than its file system or the file size limit "
                    "(ulimit -f) allows: free some space, or write to another file system.")
WRITE_HINTS = {  # what to do about a write error, by its OS error number
    errno.EROFS: "The file system is read-only: choose a folder on a writable one.",
    errno.EACCES: "No permission to write there: choose another folder, or change its permissions.",
    errno.EPERM: "No permission to write there: choose another folder, or change its permissions.",
    errno.EFBIG: "The file is larger than this file system allows for one file (FAT32: 4 GiB) or than the "
                 "process's file size limit (ulimit -f): write to another file system, or raise the limit.",
    errno.ENOTDIR: "A part of the path is a file, not a folder: choose another path.",
    errno.EISDIR: "The path is a folder, not a file: choose another path.",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a full disk or quota.

    Libraries report it differently: Python and pyarrow raise OSError(ENOSPC), safetensors a
    SafetensorError whose text says "os error 28", torch.save a RuntimeError whose context is
    the OSError, datasets a DatasetGenerationError caused by it.
    """
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(text in str(e).lower() for text in DISK_FULL_TEXT) for e in _chain(exc))


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind `exc`: an OSError's, or the "(os error N)" that safetensors' and
    other Rust libraries' errors carry in their text; None when there is none."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = OS_ERROR_TEXT.search(str(e))
        if found:
            return int(found.group(1))
    return None


def _without_disk_advice(hint: str | None) -> str:
    """A caller's hint for a full disk, for another write error: its "free some disk space" dropped."""
    if not hint:
        return ""
    hint = re.sub(r"(^|\. )[Ff]ree some disk space and (\w)", lambda m: m.group(1) + m.group(2).upper(), hint)
    return re.sub(r"[Ff]ree some disk space and ", "", hint)


def disk_error(exc: BaseException, what: Path | str, hint: str | None = None) -> LoraCliError:
    """Translate an error raised while writing into a message a user can act on: the path, the
    cause in the system's words, and what to do about that cause (WRITE_HINTS) before `hint`."""
    if is_disk_full(exc):
        return LoraCliError(
            f"No space left on the device while writing {what}.",
            hint or "Nothing was replaced: the previous version (if any) is intact. "
                    "Free some disk space and run the command again.",
        )
    number = os_errno(exc)
    short = SHORT_WRITE.search(str(exc))
    if number is None and short:  # numpy's tofile (the GGUF writer): a write cut short, its errno lost
        return LoraCliError(f"Could not write {what}: the write was cut short ({short.group(0)}).",
                            " ".join(filter(None, (SHORT_WRITE_HINT, _without_disk_advice(hint)))))
    reason = os.strerror(number) if number else exc
    advice = " ".join(filter(None, (WRITE_HINTS.get(number, ""), _without_disk_advice(hint))))
    return LoraCliError(f"Could not write {what}: {reason}.", advice or None)


def write_failure(exc: BaseException, what: Path | str, hint: str | None = None) -> LoraCliError | None:
    """A LoraCliError for a failed write that a user can act on (full disk, OS error, a library's
    error carrying an OS error number); None for a bug."""
    if isinstance(exc, LoraCliError):
        return exc
    if is_disk_full(exc) or isinstance(exc, OSError) or os_errno(exc) in WRITE_HINTS or SHORT_WRITE.search(str(exc)):
        return disk_error(exc, what, hint)
    return None


def filesystem_failure(exc: BaseException) -> LoraCliError | None:
    """A LoraCliError naming the path and the cause for an OS error on a file the user chose
    (read-only, no permission, too large, no space, a file in the path); None for anything else."""
    if isinstance(exc, LoraCliError):
        return None
    number = os_errno(exc)
    if number not in WRITE_HINTS and not is_disk_full(exc):
        return None
    path = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    if path is None:
        return None  # no path to name: a bug, reported as one
    if is_disk_full(exc):
        return disk_error(exc, path)
    return LoraCliError(f"Cannot use {path}: {os.strerror(number)}.", WRITE_HINTS[number])


def sha256_of(fh, on_chunk=None) -> str:
    """Hex sha256 of a binary file object, read in 1 MiB chunks (memory stays flat); `on_chunk(bytes)`
    sees each chunk too (to count lines, say)."""
    import hashlib

    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return h.hexdigest()


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


def _owner() -> str:
    return f"{socket.gethostname().replace('.', '_')}~{os.getpid()}"


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary beside `name`: `.tmp-<name>.<host>~<pid>.` (mkstemp adds a random tail)."""
    return f"{TMP_PREFIX}{name}.{_owner()}."


@contextlib.contextmanager
def atomic_path(dest: Path | str, hint: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside `dest`; rename it onto `dest` if the block succeeds.

    `hint` replaces the generic advice in the message of a failed write (e.g. a full disk).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(dest.name), dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; a normal file respects the umask
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        fault_point(f"file:{dest.name}")
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        failure = write_failure(exc, dest, hint) if isinstance(exc, Exception) else None
        if failure is None or failure is exc:
            raise
        raise failure from exc


def check_new_file(dest: Path | str, force: bool, flag: str = "-o", inputs: tuple = ()) -> None:
    """Refuse to write the user-named file `dest` over an existing one (unless `force`) or, even with
    `force`, over one of the command's own `inputs` (files it reads: replacing one loses the data the
    output was made from). Errors: LoraCliError naming `dest` and `flag`."""
    dest = Path(dest)
    if not dest.exists():
        return
    for source in inputs:
        if source is not None and Path(source).exists() and dest.samefile(source):  # links included
            raise LoraCliError(f"{flag} {dest} is also an input of this command; refusing to write over it, "
                               "even with --force.", f"Choose another {flag} file.")
    if not force:
        raise LoraCliError(f"{dest} already exists.", f"Pass --force to replace it, or choose another {flag} file.")


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(dest: Path | str, replace: bool = False, hint: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; rename it onto `dest` if the block succeeds.

    With `replace`, an existing `dest` is moved aside first and removed only after the new
    folder is in place; without it, an existing `dest` is an error. `hint` as for atomic_path.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(dest.name), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        fault_point(f"dir:{dest.name}")
        _swap_in(tmp, dest, replace)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(exc, dest, hint) if isinstance(exc, Exception) else None
        if failure is None or failure is exc or isinstance(exc, FileExistsError):
            raise
        raise failure from exc


def _swap_in(tmp: Path, dest: Path, replace: bool) -> None:
    """Rename the finished `tmp` onto `dest`; an old `dest` is set aside until the new one is in."""
    old = None
    if dest.exists():
        if not replace:
            raise FileExistsError(errno.EEXIST, "exists", str(dest))
        old = Path(tempfile.mkdtemp(prefix=tmp_prefix(f"old-{dest.name}"), dir=dest.parent))
        os.replace(dest, old / dest.name)
        fault_point(f"dir-swap:{dest.name}")
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    """Whether the writer that made temporary `name` may still be at work.

    Names without an owner tag, or made on another host (a shared filesystem), count as alive:
    only what is certainly abandoned is removed.
    """
    host = _owner().split("~")[0]
    tags = [part.partition("~") for part in name.split(".") if "~" in part]
    pids = [int(pid) for tag_host, _, pid in tags if tag_host == host and pid.isdigit()]
    return not pids or pid_alive(pids[-1])


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host may still be running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, alive
        pass
    return True


def remove_stale_temporaries(folder: Path | str) -> None:
    """Delete leftovers of killed writers in `folder`: temporaries whose writer process is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX) and not _owner_alive(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
