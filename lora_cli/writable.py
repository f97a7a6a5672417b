"""Can this output be written? Asked before anything expensive loads, so that a read-only folder,
a file where a folder should be (or the reverse) or a disk without room for the output is said in
one line at once, not after minutes of loading and training.

The answer comes from the filesystem itself: a probe file is created (and removed) where the output's
temporaries will be written, which honours permissions, ACLs, read-only mounts and root squash alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lora_cli.atomic import WRITE_HINTS, tmp_prefix
from lora_cli.errors import LoraCliError


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _probe(folder: Path, target: Path, flag: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=tmp_prefix("write-check"), dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise LoraCliError(f"{flag} {target}: cannot write in {folder}: {exc.strerror or exc}.",
                           WRITE_HINTS.get(exc.errno, "Choose another location.")) from None


def check_writable(target: Path | str, kind: str, flag: str, need_bytes: int = 0, need_what: str = "",
                   inside: bool = False) -> None:
    """Refuse an output that cannot be written, in one line naming `flag` and the path.

    kind: "folder" or "file" (what the command writes at `target`); inside: the command writes into an
    existing `target` folder as well (train), not only beside it (the temporaries renamed onto it);
    need_bytes: the room the output needs on its device (bytes), described by need_what.
    Errors: LoraCliError for a file where a folder is needed (anywhere on the path) or a folder where
    a file is, a folder that cannot be written in, too little free space.
    """
    target = Path(target)
    if kind == "folder" and target.exists() and not target.is_dir():
        raise LoraCliError(f"{flag} {target}: exists and is a file, not a folder.", "Choose another path.")
    if kind == "file" and target.is_dir():
        raise LoraCliError(f"{flag} {target}: is a folder; this command writes one file there.",
                           "Pass a file path (a new name, or an earlier output of this command).")
    base = Path(os.path.abspath(target.parent))
    while not os.path.lexists(base) and base != base.parent:  # its closest ancestor that exists (where mkdir -p starts)
        base = base.parent
    if not base.is_dir():
        raise LoraCliError(f"{flag} {target}: {base} is a file, not a folder.", "Choose another path.")
    _probe(base, target, flag)
    if inside and target.is_dir():
        _probe(target, target, flag)
    free = shutil.disk_usage(target if inside and target.is_dir() else base).free
    if need_bytes > free:
        raise LoraCliError(f"{flag} {target}: not enough space on its device: {_size(free)} free, about "
                           f"{_size(need_bytes)} needed{f' ({need_what})' if need_what else ''}.",
                           "Free some disk space, or choose a folder on another device.")
