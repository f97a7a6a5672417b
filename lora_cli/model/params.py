"""Count parameters truthfully: total, trainable, and where they are.

4-bit weights are stored packed (two values a byte), so `numel()` of a bitsandbytes
Params4bit is half the real count; we read the logical shape from its quant state. A model
can also be built from its config alone on the meta device, so the numbers are known before
any weights are downloaded.
"""

from __future__ import annotations


import re
from dataclasses import asdict, dataclass, field

from lora_cli.config import LoraSettings

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


def true_numel(param) -> int:
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for s in state.shape:
            n *= int(s)
        return n
    return param.numel()


def count_parameters(model, base_model: str = "", lora: LoraSettings | None = None) -> ParamSummary:
    rows: dict[str, ModuleRow] = {}
    total = trainable = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        n = true_numel(param)
        total += n
        t = n if param.requires_grad else 0
        trainable += t
        module = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        module = _LAYER_INDEX.sub(".*.", module)
        row = rows.setdefault(module, ModuleRow(module, 0, 0, 0))
        row.count += 1
        row.params += n
        row.trainable += t
    return ParamSummary(total, trainable, list(rows.values()), base_model, lora)


def summary_for_model(name: str, lora_settings: LoraSettings, trust_remote_code: bool = False) -> ParamSummary:
    """Parameter counts of model `name` (hub id, folder, embedded name) with LoRA, from its config.json
    alone: no weights are loaded or downloaded."""
    from lora_cli.model.resolve import resolve_model

    resolved = resolve_model(name, need_weights=False)
    return summary_from_config(resolved.path, lora_settings, name, trust_remote_code)


def summary_from_config(config_dir, lora_settings, base_model: str = "", trust_remote_code: bool = False) -> ParamSummary:
    """Build the model on the meta device from config.json alone, attach LoRA (every target
    name checked: model/targets.py), count."""
    from lora_cli.model.load import attach_lora, meta_model

    # counts do not depend on the initialisation, and pissa/olora/loftq would compute on meta tensors
    model = attach_lora(meta_model(config_dir, trust_remote_code),
                        lora_settings.model_copy(update={"init_lora_weights": "default"}), base_model or str(config_dir))
    return count_parameters(model, base_model, lora_settings)
