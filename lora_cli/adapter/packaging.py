"""The adapter folder as one zip with a manifest (sha256 and size of every file), and its check.

The zip is written under a temporary name and renamed into place. Unpacking refuses any
member whose path would land outside the target folder (zip-slip). `open_adapter` lets every
command that reads an adapter take its zip as well as its folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from lora_cli import __version__
from lora_cli.adapter import consistency
from lora_cli.adapter.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINTS,
    LOGS,
    AdapterInfo,
    base_model_info,
    base_model_of,
    check_loadable,
    read_adapter,
)
from lora_cli import faults
from lora_cli.atomic import TMP_PREFIX, atomic_path, remove_stale_temporaries, sha256_of
from lora_cli.errors import LoraCliError
from lora_cli.lock import exclusive
from lora_cli.writable import check_writable

MANIFEST = "MANIFEST.json"
DAMAGED_HINT = "Copy the zip again from its source, or package the adapter folder again (lora-cli package)."
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first bytes: a file starting so is a zip, intact or not
EXCLUDED_DIRS = (CHECKPOINTS, LOGS)


def adapter_files(folder: Path) -> list[Path]:
    """The files the zip holds: no links, nothing under EXCLUDED_DIRS, no temporaries of a killed write."""
    return [path for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()
            and path.relative_to(folder).parts[0] not in EXCLUDED_DIRS
            and not any(part.startswith(TMP_PREFIX) for part in path.relative_to(folder).parts)]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_of(fh)


def package(folder: str | Path, dest: str | Path, force: bool = False) -> dict:
    """Zip the adapter `folder` into `dest` with MANIFEST.json; returns the manifest.

    Errors (LoraCliError, before anything is written): `dest` exists (without `force`), is a folder,
    lies inside `folder`, cannot be written or has no room for the files; another process writes it.
    """
    folder, dest = check_loadable(folder), Path(dest)
    if dest.resolve().is_relative_to(folder.resolve()):
        raise LoraCliError(f"The zip {dest} cannot be written inside the folder it packs ({folder}).")
    files = adapter_files(folder)
    check_writable(dest, "file", "-o", sum(p.stat().st_size for p in files), "the adapter's files, before compression")
    if dest.exists() and not force:
        raise LoraCliError(f"{dest} already exists.", "Pass --force to replace it, or -o to choose another name.")
    with exclusive(dest, f"{dest}", "Wait for that command to finish, or choose another -o name."):
        return _write_zip(folder, files, dest)


def _write_zip(folder: Path, files: list[Path], dest: Path) -> dict:
    remove_stale_temporaries(dest.resolve().parent)  # zips of killed runs
    manifest = {
        "lora_cli_version": __version__, "base_model": base_model_of(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {p.relative_to(folder).as_posix(): {"sha256": _sha256_file(p), "size": p.stat().st_size}
                  for p in files},
    }
    with atomic_path(dest, hint=f"Nothing was replaced{' (the previous ' + dest.name + ' is intact)' if dest.exists() else ''}. "
                          "Free some disk space and run the command again.") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for n, p in enumerate(files):
                zf.write(p, p.relative_to(folder).as_posix())
                if n == 0:
                    faults.point("zip:partial")
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
    return manifest


@dataclass
class Verification:
    ok: bool
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    config_mismatch: str | None = None  # adapter_config.json does not describe the weights (adapter.consistency)


def safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not (p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]))


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise LoraCliError(f"{path} does not exist.") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise LoraCliError(f"{path} is not intact: not a readable zip file ({exc}); it may be truncated or damaged.",
                           DAMAGED_HINT) from None


@contextlib.contextmanager
def _reading(path: Path, name: str) -> Iterator[None]:
    """Turn a damaged member (a CRC mismatch, a broken deflate stream, data cut short) into one message
    naming the zip and the member, for every command that reads a packaged adapter."""
    try:
        yield
    except zipfile.BadZipFile as exc:
        why = "CRC mismatch" if "CRC" in str(exc) else str(exc)
        raise LoraCliError(f"{path} is not intact: member {name}: {why}.", DAMAGED_HINT) from None
    except (zlib.error, EOFError) as exc:
        raise LoraCliError(f"{path} is not intact: member {name} cannot be decompressed ({exc or 'cut short'}).",
                           DAMAGED_HINT) from None


def _starts_as_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ZIP_MAGIC
    except OSError:
        return False


def verify(path: str | Path) -> Verification:
    path = Path(path)
    with _open(path) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        if MANIFEST not in names:
            raise LoraCliError(f"{path} has no {MANIFEST}; it was not made by lora-cli package.")
        try:
            with _reading(path, MANIFEST):
                raw = zf.read(MANIFEST)
            manifest = json.loads(raw)
            listed = manifest["files"]
        except (ValueError, KeyError, TypeError):
            raise LoraCliError(f"{path}: {MANIFEST} is not valid.") from None
        result = Verification(True, manifest=manifest)
        result.unsafe = [n for n in names if not safe_member(n)]
        present = set(names) - {MANIFEST}
        result.missing = sorted(set(listed) - present)
        result.extra = sorted(present - set(listed))
        # a name stored twice: only one copy was hashed, but an unpacker may write either
        result.extra += sorted(f"{n} (stored {k} times)" for n, k in Counter(names).items() if k > 1)
        for name in sorted(present & set(listed)):
            with _reading(path, name), zf.open(name) as fh:
                digest = sha256_of(fh)
            if digest != listed[name].get("sha256") or zf.getinfo(name).file_size != listed[name].get("size"):
                result.changed.append(name)
        if {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= present:
            result.config_mismatch = _config_mismatch(zf, path)
    result.ok = not (result.changed or result.missing or result.extra or result.unsafe or result.config_mismatch)
    return result


def _config_mismatch(zf: zipfile.ZipFile, path: Path) -> str | None:
    """What the zip's adapter_config.json gets wrong about its weights (None: they agree): a zip whose
    files all match the manifest can still hold the config of one run and the weights of another."""
    try:
        config = json.loads(zf.read(ADAPTER_CONFIG))
    except ValueError as exc:
        return f"{ADAPTER_CONFIG} is not valid JSON ({exc})"
    if not isinstance(config, dict) or not consistency.is_lora(config):
        return None  # not LoRA: left to peft, as for a folder
    with zf.open(ADAPTER_WEIGHTS) as fh:
        try:
            header = consistency.read_header(fh, f"{path}:{ADAPTER_WEIGHTS}")
        except LoraCliError as exc:
            return exc.message
    problem = consistency.mismatch(config, header)
    return f"{ADAPTER_CONFIG} does not describe {ADAPTER_WEIGHTS}: {problem}" if problem else None


def extract(path: str | Path, target: str | Path) -> Path:
    """Unpack a verified adapter zip; refuse members that would escape `target`."""
    path, target = Path(path), Path(target)
    check = verify(path)
    if check.unsafe:
        raise LoraCliError(f"{path} holds paths that escape the target folder: {', '.join(check.unsafe[:3])}.")
    if check.config_mismatch and not (check.changed or check.missing or check.extra):
        raise LoraCliError(f"{path}: {check.config_mismatch}.",
                           "Package the adapter again from a folder whose config matches its weights.")
    if not check.ok:
        raise LoraCliError(f"{path} does not match its manifest; run lora-cli package --verify {path}.")
    root = target.resolve()
    with _open(path) as zf:
        for info in zf.infolist():
            dest = (root / info.filename).resolve()
            if not dest.is_relative_to(root):
                raise LoraCliError(f"{path}: member {info.filename} would be written outside {target}.")
        target.mkdir(parents=True, exist_ok=True)
        for info in zf.infolist():
            if info.filename == MANIFEST or info.is_dir():
                continue
            dest = root / info.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


@contextlib.contextmanager
def open_adapter(path: str | Path, model: str | None = None, template: str | None = None,
                 base_only: bool = False) -> Iterator[AdapterInfo]:
    """`read_adapter` of a folder, or of an adapter zip (`lora-cli package`) unpacked for the block.
    base_only: where `path` does not exist, the base model `model` alone (folder.base_model_info)."""
    path = Path(path)
    if base_only and not path.exists():
        yield base_model_info(model, template, path)
        return
    if path.is_file() and (zipfile.is_zipfile(path) or _starts_as_zip(path)):  # a damaged zip: verify says so
        with tempfile.TemporaryDirectory(prefix="lora-cli-adapter-") as tmp:
            yield read_adapter(extract(path, Path(tmp) / "adapter"), model, template)
        return
    yield read_adapter(path, model, template)
