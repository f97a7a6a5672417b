"""`export`: checks first (format, output, architecture, tokenizer, template), then merge and write.

Everything that can refuse runs before the merge, so a refusal costs seconds, not a model load.
Files land atomically (atomic.py): a GGUF is written under a temporary name beside its destination
and renamed when complete; the ollama folder (GGUF + Modelfile) the same way, as one folder.

Base weights (`auto`, the default): those the adapter was trained against (merging.py), so the
export is the model `lora-cli generate` and `eval` ran and measured. One exception, measured
(docs/EXPORT.md): q4_0 would round NF4 values a second time onto another 4-bit grid, which broke
the embedded model's answers (val loss 1.84 -> 3.30, against 2.13 from the original weights), so
for q4_0 `auto` takes the original weights and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli import __version__
from lora_cli.adapter.folder import load_template
from lora_cli.adapter.merging import BASE_WEIGHTS, check_output, merged_model, trained_base_weights
from lora_cli.atomic import atomic_dir, atomic_path
from lora_cli.data import chat_template as ct
from lora_cli.errors import LoraCliError
from lora_cli.export import FORMATS, MODELFILE, OLLAMA_GGUF, OUTTYPES
from lora_cli.export import modelfile as mf
from lora_cli.export.architecture import check_config
from lora_cli.export.gguf_lora import LORA_OUTTYPES, write_lora_gguf
from lora_cli.export.gguf_model import write_model_gguf
from lora_cli.export.vocab import check_tokenizer
from lora_cli.lock import exclusive
from lora_cli.model.load import load_tokenizer, quiet_libraries
from lora_cli.model.resolve import resolve_model
from lora_cli.progress import NULL_REPORTER
from lora_cli.writable import check_writable

GGUF_MAGIC = b"GGUF"


@dataclass
class ExportResult:
    format: str
    outtype: str
    output: str
    files: list[str]
    size_bytes: int
    seconds: float
    base_model: str
    architecture: str
    base_weights: str  # original | nf4 (what `auto` chose); "" for gguf-lora
    template: str
    prompt: str  # what to send as the user message for an instruction and its input
    tensors: dict[str, int] = field(default_factory=dict)  # GGML type -> count
    stops: list[str] = field(default_factory=list)
    ollama_create: str = ""  # the command that would import the Modelfile


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_file_output(output: Path, adapter: Path, force: bool) -> None:
    """A GGUF file destination: never a folder, never inside the adapter, replaced only with --force."""
    if output.resolve().is_relative_to(adapter.resolve()):
        raise LoraCliError(f"The GGUF cannot be written into the adapter folder {adapter}.",
                           "Choose another -o path, e.g. -o model.gguf.")
    if output.is_dir():
        raise LoraCliError(f"{output} is a folder; --format gguf and gguf-lora write one file.",
                           f"Pass a file path, e.g. -o {output / 'model.gguf'}.")
    if output.exists() and not force:
        raise LoraCliError(f"{output} already exists.", "Pass --force to replace it, or choose another -o path.")
    if output.exists() and not _is_gguf(output):
        raise LoraCliError(f"{output} is not a GGUF file; refusing to replace it, even with --force.",
                           "Choose another -o path.")


def _validate(fmt: str, outtype: str, base_weights: str) -> None:
    for flag, value, allowed in (("--format", fmt, FORMATS), ("--outtype", outtype, OUTTYPES),
                                 ("--base-weights", base_weights, BASE_WEIGHTS)):
        if value not in allowed:
            raise LoraCliError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}.")
    if fmt == "gguf-lora" and outtype not in LORA_OUTTYPES:
        raise LoraCliError(f"--outtype {outtype} is not offered for --format gguf-lora; use one of "
                           f"{', '.join(LORA_OUTTYPES)} (an adapter is small: f16 or f32 keeps it exact).")


def _eos_texts(tokenizer, model_dir: Path) -> list[str]:
    """The eos training appends, then any other end token the model's generation config names (as generate stops)."""
    ids = [tokenizer.eos_token_id]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        extra = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids += [i for i in (extra if isinstance(extra, list) else [extra]) if isinstance(i, int) and i not in ids]
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def export(info, output: str | Path, fmt: str = "gguf", outtype: str = "f16", base_weights: str = "auto",
           force: bool = False, reporter=NULL_REPORTER) -> ExportResult:
    """Export the adapter `info` (adapter_info.AdapterInfo) to `output` (a .gguf file, or a folder for ollama).

    Raises LoraCliError (one message) for a bad flag or destination, an architecture, tokenizer or
    template that cannot be mapped, before anything is loaded or written.
    """
    _validate(fmt, outtype, base_weights)
    output, t0 = Path(output), time.time()
    check_writable(output, "folder" if fmt == "ollama" else "file", "-o")
    with exclusive(output, f"{output}", "Wait for that command to finish, or choose another -o path."):
        replace = check_output(output, info.path, force, "ollama export", MODELFILE, "ollama-model") \
            if fmt == "ollama" else check_file_output(output, info.path, force)
        return _export(info, output, fmt, outtype, base_weights, replace, t0, reporter)


def _export(info, output: Path, fmt: str, outtype: str, base_weights: str, replace: bool, t0: float,
            reporter) -> ExportResult:
    template = load_template(info)
    from transformers import AutoConfig

    quiet_libraries()
    resolved = resolve_model(info.base_model, reporter)
    config = AutoConfig.from_pretrained(str(resolved.path), trust_remote_code=info.trust_remote_code)
    spec = check_config(config, info.base_model)
    if fmt == "gguf-lora":
        return _export_lora(info, output, outtype, spec, template, t0, reporter)
    # --base-weights auto (module docstring): merge's, the weights training used, except NF4 under q4_0
    weights = base_weights if base_weights != "auto" else \
        "original" if outtype == "q4_0" else trained_base_weights(info.quantization)
    if info.quantization == "nf4" and weights != "nf4":
        reporter.message(f"Merging into the original base weights, not the NF4 weights the adapter was trained and "
                         f"evaluated on{' (q4_0 on NF4 values rounds twice to 4 bits)' if outtype == 'q4_0' else ''}: "
                         "the exported model is not exactly the one `lora-cli eval` measured.")
    plan = _prompt_plan(info, template, resolved.path, fmt)
    model, tokenizer = merged_model(info, "fp32", weights, reporter)
    meta = {"name": f"{info.base_model} + {info.path.name}", "version": __version__, "template": info.template,
            "base_weights": weights, "prompt": plan["prompt"]}
    counts = _write(output, fmt, replace, model, tokenizer, spec, outtype, plan, meta, reporter)
    files = sorted(p.name for p in output.iterdir()) if output.is_dir() else [output.name]
    size = sum(p.stat().st_size for p in output.iterdir()) if output.is_dir() else output.stat().st_size
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in output.resolve().name.lower()).strip("-.")
    create = f"ollama create {name or 'lora-cli-model'} -f {output / MODELFILE}" if fmt == "ollama" else ""
    return ExportResult(fmt, outtype, str(output), files, size, round(time.time() - t0, 2), info.base_model,
                        spec.arch_name, weights, info.template, plan["prompt"], counts, plan["stops"], create)


def _prompt_plan(info, template, model_dir: Path, fmt: str) -> dict:
    """Chat template, Ollama shape and stops, from the tokenizer alone: template refusals come before the merge."""
    tokenizer = load_tokenizer(info.tokenizer_dir or model_dir, info.trust_remote_code)
    check_tokenizer(tokenizer)  # refused here, before the merge, rather than while writing
    plan = {"jinja": ct.training_chat_template(template, tokenizer, info.add_eos), "prompt": ct.describe_mapping(template),
            "stops": [], "shape": None}
    if fmt == "ollama":
        shape = mf.chat_shape(tokenizer, tokenizer.eos_token, info.add_eos) if isinstance(template, ct.ChatTemplate) \
            else mf.text_shape(template, tokenizer.eos_token if info.add_eos else "")
        plan["shape"], plan["stops"] = shape, mf.stop_strings(template, shape, _eos_texts(tokenizer, model_dir))
    return plan


def _write(output: Path, fmt: str, replace: bool, model, tokenizer, spec, outtype, plan, meta, reporter) -> dict:
    if fmt == "gguf":
        with atomic_path(output) as tmp:
            return write_model_gguf(tmp, model, tokenizer, spec, outtype, plan["jinja"], meta, reporter)
    notes = [f"Adapter: {meta['name']}; template {meta['template']}; base weights {meta['base_weights']}; "
             f"{outtype}.", f"Send as the prompt: {plan['prompt']}.", f"Create: ollama create NAME -f {MODELFILE}"]
    text = mf.modelfile_text(OLLAMA_GGUF, plan["shape"], plan["stops"], notes)
    with atomic_dir(output, replace=replace) as tmp:
        counts = write_model_gguf(tmp / OLLAMA_GGUF, model, tokenizer, spec, outtype, plan["jinja"], meta, reporter)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
    return counts


def _export_lora(info, output: Path, outtype: str, spec, template, t0: float, reporter) -> ExportResult:
    try:
        prompt = ct.describe_mapping(template)
    except LoraCliError:  # the adapter carries no template, so one no message can express is no obstacle here
        prompt = f"the prompt of the template {info.template}"
    with atomic_path(output) as tmp:
        counts = write_lora_gguf(tmp, info, spec, outtype, reporter)
    return ExportResult("gguf-lora", outtype, str(output), [output.name], output.stat().st_size,
                        round(time.time() - t0, 2), info.base_model, spec.arch_name, "", info.template, prompt, counts)
