"""One writer per output: an exclusive lock on a path a command writes (an adapter folder, a zip, a
merged model, a tokenize cache entry) for as long as the command writes it.

The lock is a small file beside its target, `.<name>.lock`, holding the host, pid, start time and
command of its owner, and locked with flock(2). The kernel drops a flock when its process ends, however
it ends, so a lock file left by a killed process is not held: the next command takes it over (and says
whose it was). A clean release removes the file. Where a filesystem has no flock (some network
mounts), the file's pid decides: a live process on this host holds it, a dead one does not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from lora_cli.atomic import pid_alive
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputInUse(LoraCliError):
    """Another live lora-cli process holds the lock of the output this command would write."""

    def __init__(self, what: str, owner: dict, hint: str = ""):
        super().__init__(f"{what} is in use by another lora-cli process ({describe(owner)}).",
                         hint or "Wait for it to finish, or choose another output.")


def lock_path(target: Path | str) -> Path:
    """The lock file of `target`: `.<name>.lock` beside it (absolute, so `./a` and `a/` share one)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def describe(owner: dict) -> str:
    """`pid 123 on host h, since 03:12:05 UTC: lora-cli train ...` from a lock file's content."""
    since = f", since {owner['started']}" if owner.get("started") else ""
    command = f": {owner['command']}" if owner.get("command") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{since}{command}"


def _read(fd: int) -> dict:
    raw = os.pread(fd, 65536, 0)
    try:
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?"}  # written by a process killed mid-write
    return owner if isinstance(owner, dict) else {}


def _alive(owner: dict) -> bool:
    """Without flock: the owner named in the file may still be at work (another host: assume so)."""
    if owner.get("host") != socket.gethostname():
        return bool(owner)
    pid = owner.get("pid")
    return isinstance(pid, int) and pid_alive(pid)  # "?": a record cut short by a kill


def _flock(fd: int, mode: int) -> bool | None:
    """flock(fd, mode): True taken; False another process holds it (LOCK_NB); None this filesystem has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, mode)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in NO_FLOCK:
            return None
        raise


def _open(path: Path, wait: bool) -> tuple[int | None, dict]:
    """(fd holding the lock, the previous owner's record) or (None, the live owner's record)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        locked = _flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        owner = _read(fd)
        if locked is None:  # no flock on this filesystem: the pid in the file decides
            locked = not (owner and _alive(owner))
        if not locked:
            os.close(fd)
            return None, owner
        try:  # the owner before us removed the file after we opened it: lock the current one instead
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, owner
        os.close(fd)


def refuse_if_held(target: Path | str, what: str, hint: str = "") -> None:
    """Refuse at once (OutputInUse) when a live process holds `target`'s lock; changes nothing on disk.

    For checks made before the lock is taken (a folder's contents read before torch loads): what a
    live run's folder holds is not yet what it will hold, so it is said to be in use, not judged."""
    import fcntl

    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file (or none readable): nobody holds it
    try:  # a shared flock tried and dropped at once: True free, False held, None no flock here
        state, owner = _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB), _read(fd)
        if state:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if state is False or (state is None and owner and _alive(owner)):
            raise OutputInUse(what, owner, hint)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(target: Path | str, what: str, hint: str = "", reporter=NULL_REPORTER, wait: bool = False,
              enabled: bool = True) -> Iterator[Path | None]:
    """Hold the lock of `target` for the block; yields the lock file (None when not `enabled`).

    what: how the refusal names the target ("Output folder adapters"); hint: the way forward.
    wait: wait for the owner to finish instead of refusing (said once, naming the owner).
    enabled: False on processes that write nothing (the non-main processes of a distributed run).
    Errors: OutputInUse when a live process holds it; LoraCliError when the lock file cannot be
    written (its folder is read-only or a file).
    """
    if not enabled:
        yield None
        return
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, owner = _open(path, wait=False)
        if fd is None and wait:
            reporter.message(f"Waiting for {describe(owner)}, which is writing {target}.")
            fd, owner = _open(path, wait=True)
    except OSError as exc:
        raise LoraCliError(f"Cannot lock {target}: {path}: {exc.strerror or exc}.",
                           "Choose a writable location.") from None
    if fd is None:
        raise OutputInUse(what, owner, hint)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
    try:  # who holds it, for a refused command to name
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
    except OSError as exc:
        os.close(fd)
        raise LoraCliError(f"Cannot lock {target}: {path}: {exc.strerror or exc}.", "Choose a writable location.") from None
    if owner:
        reporter.message(f"Took over the lock of {target} from {describe(owner)}, which ended without releasing it.")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        os.close(fd)
