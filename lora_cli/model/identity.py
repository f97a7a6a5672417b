"""Which base model a run trains on, beyond its name: a folder replaced in place, or a hub id whose
revision moved on, is another base, and a checkpoint of the old one must not be resumed on it.

- A hub model: the revision (commit) its local snapshot was resolved to.
- A local folder (and the embedded model's converted folder): the sha256 of its config.json, and a
  digest of its weight files (*.safetensors): per file its name, its size, its header (tensor names,
  dtypes, shapes, offsets) and SAMPLES evenly spaced samples of SAMPLE_BYTES of its data. That reads
  about 1 MiB a file, whatever the model's size, and changes with any other weights (a re-download,
  another revision, another fine-tune); an edit of a few bytes between the samples could go unseen.
  File times are left out: a copy of the same files is the same base.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        h.update(head + fh.read(min(header_len, size)))
        data_start = 8 + header_len
        span = max(size - data_start - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            fh.seek(data_start + span * i // max(SAMPLES - 1, 1))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def base_identity(resolved) -> dict:
    """What identifies the base `resolved` (resolve.ResolvedModel): {"revision": commit} for a hub
    model, {"config_sha256", "weights"} (16 hex digits each) for a folder. Reads ~1 MiB a weight file."""
    path = Path(resolved.path)
    if resolved.source == "hub":
        return {"revision": path.name}
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else ""
    files = sorted(path.glob("*.safetensors"))  # the weights: one sha256 over each file's digest in turn ("": none)
    weights = hashlib.sha256("".join(_file_digest(f) for f in files).encode()).hexdigest()[:16] if files else ""
    return {"config_sha256": digest, "weights": weights}


def describe_change(then: dict, now: dict) -> str:
    """What differs between two base identities, in words ("" when nothing does)."""
    parts = []
    if then.get("revision") != now.get("revision") and (then.get("revision") or now.get("revision")):
        parts.append(f"its revision ({then.get('revision') or 'a local folder'} there, "
                     f"{now.get('revision') or 'a local folder'} now)")
    if then.get("config_sha256") != now.get("config_sha256") and "revision" not in now:
        parts.append("its config.json")
    if then.get("weights") != now.get("weights") and "revision" not in now:
        parts.append(f"its weights (digest {then.get('weights') or '-'} there, {now.get('weights') or '-'} now)")
    return " and ".join(parts)
