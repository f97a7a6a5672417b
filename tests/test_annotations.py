"""Every seam of training, data and the adapter folder is typed: each function parameter and each
class-level field in lora_cli/train, lora_cli/data and lora_cli/adapter carries an annotation, and
none is the catch-all `object`.

Checked on the source, so annotations that exist only for the type checker (imports under
TYPE_CHECKING, which keep `lora-cli --help` free of torch) count as well.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_cli"
TYPED_FOLDERS = ("train", "data", "adapter")


def _is_object(annotation: ast.expr) -> bool:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a string annotation
        annotation = ast.parse(annotation.value, mode="eval").body
    return isinstance(annotation, ast.Name) and annotation.id == "object"


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    args = function.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    return [a for a in every if a.arg not in ("self", "cls")]


def _untyped(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in _parameters(node):
                if arg.annotation is None:
                    found.append(f"{where}:{arg.lineno}: parameter {arg.arg} of {node.name} has no annotation")
                elif _is_object(arg.annotation):
                    found.append(f"{where}:{arg.lineno}: parameter {arg.arg} of {node.name} is typed object")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign):
                    names = ", ".join(ast.unparse(t) for t in item.targets)
                    found.append(f"{where}:{item.lineno}: field {names} of {node.name} has no annotation")
                elif isinstance(item, ast.AnnAssign) and _is_object(item.annotation):
                    found.append(f"{where}:{item.lineno}: field {ast.unparse(item.target)} of {node.name} is typed object")
    return found


def test_every_parameter_and_field_in_train_data_and_adapter_is_annotated_and_none_is_object():
    found = [line for folder in TYPED_FOLDERS for path in sorted((PACKAGE / folder).rglob("*.py"))
             for line in _untyped(path)]
    assert not found, f"{len(found)} untyped:\n" + "\n".join(found)


def test_the_annotation_check_catches_a_bare_parameter_an_object_parameter_and_both_kinds_of_bad_field(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("class Seam:\n    limit = 3\n    owner: object\n    size: int = 2\n"
                      "    def run(self, steps, *, rate: 'object', scale: float) -> None: ...\n")
    found = [line.split(": ", 1)[1] for line in _untyped(sample, root=tmp_path)]
    assert sorted(found) == sorted([
        "parameter steps of run has no annotation", "parameter rate of run is typed object",
        "field limit of Seam has no annotation", "field owner of Seam is typed object"]), found
