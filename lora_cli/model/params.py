"""Count parameters truthfully: total, trainable, and where they are.

4-bit weights are stored packed (two values a byte), so `numel()` of a bitsandbytes
Params4bit is half the real count; we read the logical shape from its quant state. A model
can also be built from its config alone on the meta device, so the numbers are known before
any weights are downloaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from lora_cli.config import LoraSettings
from lora_cli.model.load import attach_lora, meta_model
from lora_cli.model.resolve import resolve_model

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."


@dataclass
class ModuleRow:
    module: str  # name pattern, layer index replaced by *
    count: int  # how many tensors match the pattern
    params: int
    trainable: int


@dataclass
class ParamSummary:
    total: int
    trainable: int
    modules: list[ModuleRow] = field(default_factory=list)
    base_model: str = ""
    lora: LoraSettings | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)  # the LoRA settings (a pydantic model) are copied as they are: dump them
        d["lora"] = self.lora.model_dump() if self.lora is not None else None
        d["percent"] = round(self.percent, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ParamSummary":
        lora = d.get("lora") or None
        return cls(total=d["total"], trainable=d["trainable"], modules=[ModuleRow(**m) for m in d.get("modules", [])],
                   base_model=d.get("base_model", ""), lora=LoraSettings(**lora) if lora else None)


def count_parameters(model, base_model: str = "", lora: LoraSettings | None = None) -> ParamSummary:
    rows: dict[str, ModuleRow] = {}
    total = trainable = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        shape = getattr(getattr(param, "quant_state", None), "shape", None)  # a 4-bit weight's logical shape
        n = math.prod(int(s) for s in shape) if shape is not None else param.numel()
        total += n
        t = n if param.requires_grad else 0
        trainable += t
        module = _LAYER_INDEX.sub(".*.", name.removeprefix(_PEFT_PREFIX))
        row = rows.setdefault(module, ModuleRow(module, 0, 0, 0))
        row.count += 1
        row.params += n
        row.trainable += t
    return ParamSummary(total, trainable, list(rows.values()), base_model, lora)


def summary_for_model(name: str, lora_settings: LoraSettings, trust_remote_code: bool = False) -> ParamSummary:
    """Parameter counts of model `name` (hub id, folder, embedded name) with LoRA, from its config.json
    alone: built on the meta device (no weights are loaded or downloaded), LoRA attached (every target
    name checked: model/targets.py), counted."""
    model = meta_model(resolve_model(name, need_weights=False).path, trust_remote_code)
    # counts do not depend on the initialisation, and pissa/olora/loftq would compute on meta tensors
    model = attach_lora(model, lora_settings.model_copy(update={"init_lora_weights": "default"}), name)
    return count_parameters(model, name, lora_settings)
