"""What an exported artifact tells a runtime: its prompt rendering, its stops, its weights' type.

An artifact is one of what `lora-cli export` writes:
- `gguf`: a merged model file. llama.cpp renders a conversation with the chat template in its
  metadata (tokenizer.chat_template, a Jinja template), strips one leading BOS text from the
  result when its vocabulary adds a BOS itself (common/chat.cpp), and tokenizes it with special
  tokens parsed; generation ends on the vocabulary's end-of-generation tokens.
- `gguf-lora`: an adapter file, applied to a base GGUF of the same architecture; prompted with
  the base GGUF's chat template (a base model's template is not the training prompt, so the
  check renders the training prompt itself: what a user is told to send).
- `ollama`: a folder with model.gguf and a Modelfile. Ollama renders its TEMPLATE per turn (modelfile.py),
  tokenizes the text with the vocabulary's BOS added and special tokens parsed, and stops on the
  PARAMETER stop strings and the end-of-generation tokens.

The Go templates rendered here are the constructs lora-cli writes ({{ .Field }}, string
literals, if/else/end, trim markers); any other construct is named in a LoraCliError.
"""

from __future__ import annotations

import ast
import itertools
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from lora_cli.errors import LoraCliError
from lora_cli.export import MODELFILE, OLLAMA_GGUF
from lora_cli.model.embedded import EMBEDDED, _gguf_file

_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"$', re.S)


@dataclass
class Artifact:
    """An export as a runtime sees it. `render(messages)` gives the prompt text before tokenizing."""

    kind: str  # gguf | gguf-lora | ollama
    path: Path
    model_file: Path  # the GGUF holding the weights (the base GGUF for gguf-lora)
    weight_type: str  # the file type (general.file_type), else the GGML type of most matrices: F16, Q8_0, ...
    chat_template: str | None  # Jinja (gguf); None for ollama and gguf-lora
    go_template: str | None = None  # the Modelfile's TEMPLATE
    default_system: str | None = None  # the Modelfile's SYSTEM
    stop_texts: list[str] = field(default_factory=list)  # the Modelfile's PARAMETER stop values
    lora_file: Path | None = None
    strip_bos_text: bool = True  # llama.cpp strips a rendered leading BOS; Ollama does not
    bos_text: str = ""
    eos_text: str = ""

    def render(self, messages: list[dict]) -> str:
        if self.go_template is not None:
            return ollama_render(self.go_template, messages, self.default_system)
        if self.chat_template is None:
            raise LoraCliError(f"{self.path} carries no chat template to render a prompt with.")
        return jinja_render(self.chat_template, messages, self.bos_text, self.eos_text)


def _file_type(value) -> str:
    """`general.file_type` as a type name (MOSTLY_Q8_0 -> Q8_0), "" when absent or unknown.

    The file type, not the commonest tensor type: a q8_0 export keeps some matrices in F16 (gguf_model.py)
    and is still held to what Q8_0 weights should reach."""
    try:
        name = gguf.LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_") if name != "GUESSED" else ""


def gguf_fields(path: Path) -> dict:
    """The metadata of a GGUF file that the check needs (strings and numbers), and its weight type."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise LoraCliError(f"{path} cannot be read as a GGUF file ({type(exc).__name__}: {exc}).") from None
    out: dict = {}
    for name, fld in reader.fields.items():
        if name.startswith(("general.", "tokenizer.chat_template", "adapter.", "lora_cli.")) or \
                name.startswith("tokenizer.ggml.") and not name.endswith(("tokens", "merges", "token_type", "scores")):
            try:
                out[name] = fld.contents()
            except Exception:  # a field type gguf cannot convert: not one the check reads
                continue
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and t.name.endswith(".weight"))
    out["weight_type"] = _file_type(out.get("general.file_type")) or (types.most_common(1)[0][0] if types else "?")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for key in ("bos", "eos"):
        token_id = out.get(f"tokenizer.ggml.{key}_token_id")
        if tokens is not None and isinstance(token_id, int):
            out[f"{key}_text"] = tokens.contents(token_id)
    return out


def artifact_kind(path: str | Path) -> str:
    """gguf, gguf-lora or ollama, from the files alone; LoraCliError when `path` is none of them."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODELFILE).is_file():
            raise LoraCliError(f"{path} is a folder without a {MODELFILE}; the check reads an ollama export's folder.",
                               "Pass a .gguf file, or the folder written by lora-cli export --format ollama.")
        return "ollama"
    if not path.is_file():
        raise LoraCliError(f"{path} does not exist.", "Pass a .gguf file or an ollama folder written by lora-cli export.")
    return "gguf-lora" if gguf_fields(path).get("general.type") == "adapter" else "gguf"


def default_base_gguf(base_model: str) -> Path | None:
    """The GGUF a gguf-lora export of `base_model` is checked on when none is given: the embedded model's own file
    (its weights are the model's original weights: lora-cli converts the embedded model from it)."""
    return _gguf_file(EMBEDDED[base_model]) if base_model in EMBEDDED else None


def open_artifact(path: str | Path, base_gguf: str | Path | None = None) -> Artifact:
    """The artifact at `path` (a .gguf file or an ollama folder); LoraCliError for anything else."""
    path = Path(path)
    if artifact_kind(path) == "ollama":
        return _ollama(path)
    meta = gguf_fields(path)
    if meta.get("general.type") == "adapter":
        return _lora(path, meta, base_gguf)
    return Artifact("gguf", path, path, meta["weight_type"], meta.get("tokenizer.chat_template"),
                    bos_text=meta.get("bos_text", ""), eos_text=meta.get("eos_text", ""))


def _lora(path: Path, meta: dict, base_gguf) -> Artifact:
    if base_gguf is None:
        raise LoraCliError(f"{path} is a GGUF LoRA adapter; it runs on a base GGUF.",
                           "Pass --base-gguf with the base model's GGUF (smollm2-135m: its own file is used).")
    base_gguf = Path(base_gguf)
    if not base_gguf.is_file():
        raise LoraCliError(f"--base-gguf {base_gguf} does not exist.")
    base = gguf_fields(base_gguf)
    if base.get("general.type") == "adapter":
        raise LoraCliError(f"--base-gguf {base_gguf} is itself a LoRA adapter, not a model.")
    if base.get("general.architecture") != meta.get("general.architecture"):
        raise LoraCliError(f"The adapter {path} is for {meta.get('general.architecture')}, the base GGUF {base_gguf} "
                           f"is a {base.get('general.architecture')} model.", "Pass the base model's own GGUF.")
    return Artifact("gguf-lora", path, base_gguf, base["weight_type"], None, lora_file=path,
                    bos_text=base.get("bos_text", ""), eos_text=base.get("eos_text", ""))


def _ollama(folder: Path) -> Artifact:
    modelfile = folder / MODELFILE
    commands = parse_modelfile(modelfile.read_text(encoding="utf-8"))
    values = dict(commands)
    source = values.get("from", "")
    model_file = (folder / source).resolve() if source else folder / OLLAMA_GGUF
    if "template" not in values or not model_file.is_file():
        raise LoraCliError(f"{modelfile} has no TEMPLATE, or its FROM {source!r} is not a GGUF file beside it.")
    meta = gguf_fields(model_file)
    return Artifact("ollama", folder, model_file, meta["weight_type"], meta.get("tokenizer.chat_template"),
                    go_template=values["template"], default_system=values.get("system"),
                    stop_texts=[v for k, v in commands if k == "stop"], strip_bos_text=False,
                    bos_text=meta.get("bos_text", ""), eos_text=meta.get("eos_text", ""))


def jinja_render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """A Jinja chat template rendered as transformers and llama-cpp-python render it (sandboxed, trim_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos)
    except TemplateError as exc:
        raise LoraCliError(f"The GGUF's chat template does not render a prompt: {exc}") from None


def _go_unquote(body: str) -> str:
    """A Go string literal's value: the escapes lora-cli writes (\\n, \\", \\u00e9, \\U0001f600) are Python's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an escape Python lacks is kept as written (it warns of it)
        return ast.literal_eval(f'"""{body}"""')


def _go_items(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], trim markers applied. An action ends at the first "}}": the string
    literals lora-cli writes hold no braces (modelfile.go_string escapes them)."""
    items, pos = [], 0
    for action in re.finditer(r"\{\{(- )?(.*?)( -)?\}\}", template, re.S):
        text = template[pos:action.start()]
        items += [("text", text.rstrip(" \t\r\n") if action[1] else text), ("action", action[2].strip())]
        pos = action.end()
        if action[3]:
            pos += len(template[pos:]) - len(template[pos:].lstrip(" \t\r\n"))
    if "{{" in template[pos:]:
        raise LoraCliError("The Modelfile's TEMPLATE has an unclosed {{ action.")
    return items + [("text", template[pos:])]


def parse_go_template(template: str) -> list:
    """Nodes: str, ("field", name), {"field", "then", "else"}; LoraCliError for a construct not rendered here."""
    stack: list[list] = [[]]
    branches: list[dict] = []
    for kind, value in _go_items(template):
        if kind == "text":
            stack[-1].append(value)
        elif re.fullmatch(r"if \.\w+", value):
            node = {"field": value[4:], "then": [], "else": []}
            stack[-1].append(node)
            branches.append(node)
            stack.append(node["then"])
        elif value in ("else", "end") and branches:
            stack.pop()
            if value == "else":
                stack.append(branches[-1]["else"])
            else:
                branches.pop()
        elif re.fullmatch(r"\.\w+", value):
            stack[-1].append(("field", value[1:]))
        elif _STRING.match(value):
            stack[-1].append(_go_unquote(_STRING.match(value).group(1)))
        else:
            raise LoraCliError(f"The Modelfile's TEMPLATE uses {{{{ {value} }}}}, which the check does not render "
                               "(it renders the templates lora-cli export writes).")
    if branches:
        raise LoraCliError("The Modelfile's TEMPLATE has an {{ if }} without {{ end }}.")
    return stack[0]


def _go_execute(nodes: list, values: dict, cut: bool, out: list[str]) -> bool:
    """Appends the rendered text to `out`; True once `.Response` was written with `cut` (Ollama's last turn)."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, tuple):
            out.append(values.get(node[1], ""))
            if cut and node[1] == "Response":
                return True
        elif _go_execute(node["then"] if values.get(node["field"]) else node["else"], values, cut, out):
            return True
    return False


def ollama_render(template: str, messages: list[dict], default_system: str | None = None) -> str:
    """Ollama's legacy Execute: SYSTEM default, messages of one role collated, the template run per turn,
    the last turn cut after `{{ .Response }}`."""
    nodes = parse_go_template(template)
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    collated = [{"role": role, "content": "\n\n".join(m["content"] for m in turn)}
                for role, turn in itertools.groupby(messages, key=lambda m: m["role"])]
    out: list[str] = []
    values = {"System": "", "Prompt": "", "Response": ""}
    for msg in collated:
        if (msg["role"] == "system" and (values["Prompt"] or values["Response"])) or \
                (msg["role"] == "user" and values["Response"]):
            _go_execute(nodes, values, False, out)
            values = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(msg["role"])
        if key:
            values[key] = msg["content"]
    _go_execute(nodes, values, True, out)
    return "".join(out)


def _unquote(raw: str) -> tuple[str, bool]:
    for quote in ('"""', '"'):
        if raw.startswith(quote):
            done = len(raw) >= 2 * len(quote) and raw.endswith(quote)
            return (raw[len(quote):-len(quote)], True) if done else ("", False)
    return raw, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, value)] as Ollama's parser reads them (parser/parser.go): `#` comments, quoted or
    bare values, PARAMETER NAME VALUE as (NAME, VALUE). LoraCliError for an unterminated value."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or len(text)
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        if m is None:
            raise LoraCliError(f"The Modelfile cannot be read at {text[i:i + 30]!r}.")
        name, i = m.group(1).lower(), m.end()
        if name == "parameter":
            m = re.compile(r"(\w+)[ \t]+").match(text, i)
            name, i = m.group(1).lower(), m.end()
        buf = []
        while True:
            if i >= len(text) or text[i] in " \t\r\n":
                value, ok = _unquote("".join(buf).strip())
                if ok:
                    break
                if i >= len(text):
                    raise LoraCliError(f"The Modelfile's {name.upper()} value is not closed.")
            if text[i] in " \t\r\n" or unicodedata.category(text[i])[0] in "LMNPS":
                buf.append(text[i])
            i += 1
        commands.append((name, value))
    return commands
