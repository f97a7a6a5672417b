"""The package's shape: imports point down the layers and never in a circle; files and functions stay small;
tests reach inside only through the fault points.

Layers, lowest first (a module may import its own layer and the ones below):
  foundation (config, config_files, errors, faults, progress, atomic, lock, writable) < model < data < adapter < infer, export < train < cli
Checked on the source (every import statement, those inside functions too), so a lazy import
that points up is caught as well.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_cli"
LAYERS = [("config", "config_files", "errors", "faults", "progress", "atomic", "lock", "writable"), ("model",), ("data",), ("adapter",), ("infer", "export"),
          ("train",), ("cli",)]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # the body, not the signature: a Typer command's signature is its list of flags


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lora_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("lora_cli"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # lora_cli itself (__version__)
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in _modules() if m not in ("lora_cli", "lora_cli.__main__") and _layer(m) is None]
    assert not unplaced, f"modules outside every layer: {unplaced}"


def test_imports_point_down_the_layers_only():
    upward = []
    for name, targets in _graph().items():
        mine = _layer(name)
        for target in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
            elif mine and theirs == mine and name.split(".")[1] != target.split(".")[1]:
                upward.append(f"{name} -> {target} (sideways, between two packages of one layer)")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_passes_400_lines_and_no_function_body_60():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {body} lines")
    assert not too_long, "\n".join(too_long)


def test_tests_import_helpers_from_their_package_and_replace_no_private_function():
    """Shared helpers come from tests/helpers (not conftest); a test that needs lora-cli to fail or to be
    watched mid-run uses a named fault point (lora_cli/faults.py), not a patched private function."""
    wrong = []
    tests = Path(__file__).resolve().parent
    for path in sorted([*tests.glob("*.py"), *tests.glob("helpers/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "conftest":
                wrong.append(f"{path.name}:{node.lineno}: from conftest import")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
                wrong.append(f"{path.name}:{node.lineno}: replaces private {node.args[1].value}")
    assert not wrong, "\n".join(wrong)


def test_no_file_name_of_the_adapter_folder_is_spelled_outside_its_module():
    """adapter/folder.py names the folder's files; everything else imports the names (docstrings aside)."""
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "run_config.yaml",
             "metrics.jsonl", "param_summary.json", "prompt_template.txt", "loss_curve.png")
    wrong = []
    for name, path in _modules().items():
        if name == "lora_cli.adapter.folder":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        wrong += [f"{name}:{node.lineno}: {file}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for file in names if file in node.value]
    assert not wrong, "\n".join(wrong)
