"""A small, honest renderer of the Go-template syntax an exported Modelfile uses, and Ollama's use of it.

No Ollama binary is available to the tests, so this reimplements, from Go's text/template and
Ollama's sources, exactly what the export emits and nothing more:
- text and actions `{{ ... }}`, with `{{-` / `-}}` trimming the whitespace beside them;
- `{{ .Field }}`, `{{ "string literal" }}` (Go's escapes), `{{ if .Field }} ... {{ else }} ... {{ end }}`
  (an empty string is false);
- anything else raises, so an export that starts emitting other constructs fails its tests;
- `ollama_render`: Ollama's Template.Execute for a template without .Messages (template.go,
  "legacy" mode): messages collated, the template executed per turn, and the output of the last
  turn cut after `{{ .Response }}`; plus the Modelfile SYSTEM default (server: a system message
  is added when the request has none);
- `parse_modelfile`: the commands of a Modelfile, with Ollama's quoting rules (parser/parser.go).
"""

from __future__ import annotations

import re
import unicodedata

_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"$', re.S)


def _go_unquote(body: str) -> str:
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = body[i + 1]
        if kind in simple:
            out.append(simple[kind])
            i += 2
        elif kind in "uU":
            width = 4 if kind == "u" else 8
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
        else:
            raise ValueError(f"unsupported escape \\{kind}")
    return "".join(out)


def _action_end(template: str, start: int) -> int:
    """Index of the "}}" closing the action opened at `start`; string literals may hold braces (Go's lexer)."""
    i = start + 2
    while i < len(template):
        if template[i] == '"':
            i += 1
            while template[i] != '"':
                i += 2 if template[i] == "\\" else 1
        elif template.startswith("}}", i):
            return i
        i += 1
    raise ValueError("unclosed action")


def tokenize(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with trim markers applied to the neighbouring text."""
    items, pos = [], 0
    while (start := template.find("{{", pos)) >= 0:
        end = _action_end(template, start)
        body, text = template[start + 2:end], template[pos:start]
        trim_left, trim_right = body.startswith("- "), body.endswith(" -")
        if trim_left:
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", body[2 if trim_left else 0: len(body) - (2 if trim_right else 0)].strip()))
        pos = end + 2
        if trim_right:
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    items.append(("text", template[pos:]))
    return items


def parse(template: str) -> list:
    """A node list: str (text), ("field", name), ("if", field, then_nodes, else_nodes)."""
    stack: list[list] = [[]]
    branches: list[dict] = []
    for kind, value in tokenize(template):
        if kind == "text":
            if value:
                stack[-1].append(value)
        elif value.startswith("if "):
            field = value[3:].strip()
            if not re.fullmatch(r"\.\w+", field):
                raise ValueError(f"unsupported condition {value!r}")
            node = {"field": field[1:], "then": [], "else": []}
            stack[-1].append(node)
            branches.append(node)
            stack.append(node["then"])
        elif value == "else":
            stack.pop()
            stack.append(branches[-1]["else"])
        elif value == "end":
            stack.pop()
            branches.pop()
        elif re.fullmatch(r"\.\w+", value):
            stack[-1].append(("field", value[1:]))
        elif _STRING.match(value):
            stack[-1].append(_go_unquote(_STRING.match(value).group(1)))
        else:
            raise ValueError(f"unsupported action {{{{ {value} }}}}")
    if branches or len(stack) != 1:
        raise ValueError("unclosed {{ if }}")
    return stack[0]


class _Cut(Exception):
    pass


def render(nodes, values: dict, cut_after_response: bool = False) -> str:
    out: list[str] = []

    def walk(items):
        for node in items:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, tuple):
                out.append(values.get(node[1], ""))
                if cut_after_response and node[1] == "Response":
                    raise _Cut
            else:
                walk(node["then"] if values.get(node["field"]) else node["else"])

    try:
        walk(nodes)
    except _Cut:
        pass
    return "".join(out)


def ollama_render(template: str, messages: list[dict], default_system: str | None = None) -> str:
    """What Ollama renders for `messages` with this TEMPLATE (no .Messages in it: legacy mode)."""
    nodes = parse(template)
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    collated: list[dict] = []
    for msg in messages:
        if collated and collated[-1]["role"] == msg["role"]:
            collated[-1] = {"role": msg["role"], "content": collated[-1]["content"] + "\n\n" + msg["content"]}
        else:
            collated.append(dict(msg))
    out, values = [], {"System": "", "Prompt": "", "Response": ""}
    for msg in collated:
        if (msg["role"] == "system" and (values["Prompt"] or values["Response"])) or \
                (msg["role"] == "user" and values["Response"]):
            out.append(render(nodes, values))
            values = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(msg["role"])
        if key:
            values[key] = msg["content"]
    return "".join(out) + render(nodes, values, cut_after_response=True)


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _kept(ch: str) -> bool:
    """Ollama's parser keeps printable runes (Go's strconv.IsPrint) and the whitespace it handles itself."""
    return ch in " \t\r\n" or unicodedata.category(ch)[0] in "LMNPS"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, value)] as Ollama's parser reads them: `#` comments; a value ends at the first blank
    after which it is complete ("...", \"\"\"...\"\"\" or a bare word); unprintable characters are dropped."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or len(text)
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        name, i = m.group(1).lower(), m.end()
        if name == "parameter":
            m = re.compile(r"(\w+)[ \t]+").match(text, i)
            name, i = m.group(1), m.end()
        buf = []
        while True:
            if i >= len(text) or text[i] in " \t\r\n":
                value, ok = _unquote("".join(buf).strip())
                if ok or i >= len(text):
                    if not ok:
                        raise ValueError(f"unterminated value for {name}")
                    break
            if _kept(text[i]):
                buf.append(text[i])
            i += 1
        commands.append((name, value))
    return commands
