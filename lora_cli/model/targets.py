"""Which modules LoRA goes on: every `--target-modules` name checked against the model.

peft matches each name of a target list against every module's full name: the same name, or
its last dotted parts (`q_proj` matches `model.layers.0.self_attn.q_proj`). A name that matches
nothing is silently dropped as long as another name matches, so a typo beside a good name
(`q_proj,v_prj`) trains without it, and `all-linear` means "every linear layer" only as the
whole value. Here every name must match at least one module LoRA can adapt, or the run stops
with one message that suggests the closest names and lists the model's linear layers; and
`all-linear` inside a list is expanded by peft's own rule (every linear layer except the
output head), so `all-linear,lm_head` is all of them. `resolve_targets` works on a model built
on the meta device from config.json alone, so the check runs before any weight is loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lora_cli.errors import LoraCliError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Targets:
    """The modules LoRA will wrap. peft_value: what peft's LoraConfig.target_modules gets
    ("all-linear" alone, or a list of names); adapted: full names of the modules it will wrap."""

    peft_value: list[str] | str
    adapted: tuple[str, ...]
    lora_parameters: int = 0  # LoRA's A and B entries over the adapted modules (check_targets fills it in)


def _linear_types() -> tuple:
    import torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def _adaptable_types() -> tuple:
    import torch

    # what peft's LoRA can wrap (bitsandbytes' Linear4bit is a torch Linear)
    return _linear_types() + (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _matches(key: str, name: str) -> bool:
    """peft's rule for a name in a target list (tuners_utils.check_target_module_exists)."""
    return key == name or key.endswith("." + name)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def linear_names(model) -> list[str]:
    """Short names of the model's linear layers, in model order, each once (q_proj, ..., lm_head)."""
    linear = _linear_types()
    return list(dict.fromkeys(_short(key) for key, module in model.named_modules()
                              if key and isinstance(module, linear)))


def all_linear(model) -> list[str]:
    """peft's expansion of all-linear on this model (every Linear/Conv1D layer except the output
    head), as short names where they are unambiguous (full module names otherwise)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # private, hence peft's pin

    config = LoraConfig(target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    chosen = set(_maybe_include_all_linear_layers(config, model).target_modules)
    others = {_short(k) for k, m in model.named_modules() if k and k not in chosen and isinstance(m, _linear_types())}
    short = {_short(k) for k in chosen}
    order = [k for k, _ in model.named_modules() if k in chosen]
    if short & others:  # a short name would also catch a layer all-linear leaves out (the head)
        return order
    return list(dict.fromkeys(_short(k) for k in order))


def _problem(model, name: str, candidates: list[str], model_name: str) -> str | None:
    """Why `name` cannot be a LoRA target of `model`, or None when it can."""
    found = [(k, m) for k, m in model.named_modules() if k and _matches(k, name)]
    if not found:
        folded = {c.lower(): c for c in candidates}
        close = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.6)
        suggest = f" (did you mean {' or '.join(repr(folded[c]) for c in close)}?)" if close else ""
        return f"'{name}' is not a module of {model_name}{suggest}"
    adaptable = _adaptable_types()
    wrong = [(k, m) for k, m in found if not isinstance(m, adaptable)]
    if wrong:
        key, module = wrong[0]
        inner = linear_names(module)
        inside = f"; its linear layers are {', '.join(inner)}" if inner else ""
        return f"'{name}' names {key}, a {type(module).__name__}, which LoRA cannot adapt{inside}"
    return None


def resolve_targets(model, names: list[str], model_name: str = "the model") -> Targets:
    """The modules of `model` that LoRA on `names` wraps, or LoraCliError naming every bad name.

    model: a transformers model, typically built on the meta device; names: the target list
    as configured (`all-linear` may be one of them, in any letter case).
    """
    wanted = [n for n in names if n.lower() != ALL_LINEAR]
    expand = len(wanted) < len(names)
    candidates = linear_names(model)
    problems = [p for p in (_problem(model, n, candidates + [ALL_LINEAR], model_name) for n in wanted) if p]
    if problems:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        name = next((k for k, m in model.named_modules() if m is head), None) if head is not None else None
        but = f" but the output head {name}" if name else ""
        raise LoraCliError(f"--target-modules: {'; '.join(problems)}.",
                           f"The linear layers of {model_name}: {', '.join(candidates)}; or {ALL_LINEAR} "
                           f"(every linear layer{but}).")
    if expand and not wanted:
        value: list[str] | str = ALL_LINEAR
        chosen = all_linear(model)
    else:
        value = list(dict.fromkeys((all_linear(model) if expand else []) + wanted))
        chosen = value
    adapted = tuple(k for k, _ in model.named_modules() if k and any(_matches(k, n) for n in chosen))
    return Targets(value, adapted)
