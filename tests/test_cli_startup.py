"""`lora-cli --help` must stay instant: no torch or transformers at import time."""

import subprocess
import sys

from typer.testing import CliRunner

from lora_cli.cli.app import app


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from lora_cli.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'bitsandbytes', 'accelerate') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_help():
    runner = CliRunner()
    for cmd in ("validate-data", "tokenize", "train", "param-report", "package"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "lora_cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lora-cli ")


def test_an_unquantized_model_loads_without_importing_bitsandbytes(tiny_model_dir):
    # bitsandbytes takes seconds to import; only a 4-bit model needs it
    code = ("import sys; from pathlib import Path; from lora_cli.model.load import load_model, dequantized_bytes; "
            f"m = load_model(Path({str(tiny_model_dir)!r}), 'none', 'fp32', 'cpu'); "
            "print(dequantized_bytes(m, 'bf16'), 'bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["0", "False"]
