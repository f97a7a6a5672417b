"""Does an adapter's config describe its weights? adapter_config.json against the tensor shapes.

An adapter folder can hold a config from one run and weights from another (files of two runs
copied together, `r` edited by hand, a config rewritten by another tool). peft builds the LoRA
layers from the config and then fails on a size mismatch, which reads as "the base model does not
fit", or silently loads weights for modules the config never names. Every reader asks here first.

Read from the safetensors header alone (8 bytes of length, then JSON: name -> dtype, shape,
offsets), so the check costs a few kilobytes and needs no torch. peft saves a LoRA pair as
`<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]; on an embedding,
`<module>.lora_embedding_A` [r, vocab] and `<module>.lora_embedding_B` [dim, r]; DoRA adds
`<module>.lora_magnitude_vector`. The rank of a module is `r`, or the `rank_pattern` entry that
matches it (peft's own rule: the pattern matches the end of the module name).
"""

from __future__ import annotations

import json
import re
import struct
from typing import BinaryIO

from lora_cli.errors import LoraCliError

_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                   r"(?:\.weight)?$")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size


def read_header(fh: BinaryIO, name: str) -> dict:
    """The tensor table of a safetensors file {tensor name: {"dtype", "shape", ...}} (no tensor data read).

    Errors: LoraCliError naming `name` when the file is not safetensors."""
    raw = fh.read(8)
    size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    try:
        if not 0 < size <= _MAX_HEADER:
            raise ValueError("no safetensors header")
        header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraCliError(f"{name} is not a safetensors file ({exc}); the adapter folder is damaged.") from None
    header.pop("__metadata__", None)
    return header


def _rank_of(module: str, config: dict) -> int:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(rank)
    return int(config["r"])


def _targeted(module: str, targets: str | list[str] | None) -> bool:
    """peft's rule for target_modules: a regex string matches the whole name; a list, its last parts."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or [])


def _lora_modules(header: dict) -> dict[str, dict[str, list[int]]]:
    """{module name (as the base model names it): {kind: shape}} for the LoRA tensors of the header."""
    modules: dict[str, dict[str, list[int]]] = {}
    for name, entry in header.items():
        found = _LORA.match(name)
        if found and isinstance(entry, dict):
            module = found["module"].removeprefix(_PEFT_PREFIX)
            modules.setdefault(module, {})[found["kind"]] = list(entry.get("shape") or [])
    return modules


def _rank_in(kinds: dict[str, list[int]]) -> int | None:
    for kind, axis in (("lora_A", 0), ("lora_embedding_A", 0), ("lora_B", -1), ("lora_embedding_B", -1)):
        shape = kinds.get(kind)
        if shape and len(shape) == 2:
            return shape[axis]
    return None


def is_lora(config: dict) -> bool:
    """Whether adapter_config.json describes LoRA layers this module can check (a rank and targets)."""
    return isinstance(config.get("r"), int) and "target_modules" in config


def mismatch(config: dict, header: dict) -> str | None:
    """What in `config` (adapter_config.json) disagrees with the weights' `header`; None when they agree.

    Checked: each LoRA module's rank against `r` / `rank_pattern`, every LoRA module against
    `target_modules`, DoRA magnitude vectors against `use_dora`. A config of another peft method
    (no `r`) is left to peft.
    """
    if not is_lora(config):
        return None
    modules = _lora_modules(header)
    for module, kinds in sorted(modules.items()):
        rank, want = _rank_in(kinds), _rank_of(module, config)
        if rank is not None and rank != want:
            return (f"it says r={want}, but the weights of {module} have rank {rank} "
                    f"(lora_A {kinds.get('lora_A') or kinds.get('lora_embedding_A')})")
    stray = sorted({m.rsplit(".", 1)[-1] for m in modules if not _targeted(m, config["target_modules"])})
    if stray:
        named = config["target_modules"]
        named = named if isinstance(named, str) else ", ".join(sorted(named))
        return f"the weights hold LoRA for {', '.join(stray)}, which its target_modules ({named}) does not name"
    dora = any("lora_magnitude_vector" in kinds for kinds in modules.values())
    if dora != bool(config.get("use_dora")):
        return (f"it says use_dora={bool(config.get('use_dora'))}, but the weights "
                f"{'hold' if dora else 'do not hold'} DoRA magnitude vectors")
    return None

