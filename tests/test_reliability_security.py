"""Security defaults: no pickle is ever unpickled, no remote code runs unless asked, no secret is saved.

Each "malicious" file here creates a marker file when unpickled or imported, so a test sees
whether lora-cli executed it, not only whether it printed an error.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_cli.cli.app import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this opens (creates) a file: the stand-in for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(model, data_files, out, *extra):
    return ["train", "--model", model, "--train", data_files[0], "-o", out, "--epochs", "1", "--precision", "fp32",
            "--device", "cpu", "--quantization", "none", "--max-length", "64", *extra]


def test_a_model_with_only_pickled_weights_is_refused_and_never_unpickled(tiny_model_dir, data_files, tmp_path):
    model = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model / "pytorch_model.bin")
    res = invoke(*train_args(model, data_files, tmp_path / "out"))
    assert res.exit_code == 1 and "no .safetensors weights" in res.output and "safetensors only" in res.output
    assert not marker.exists()


def test_pickled_weights_beside_safetensors_are_never_read(tiny_model_dir, data_files, tmp_path):
    model = tmp_path / "both"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model / "pytorch_model.bin")
    res = invoke(*train_args(model, data_files, tmp_path / "out", "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    assert not marker.exists()


def evil_model(src, dest):
    """A model folder whose config names custom code (as hub repos with auto_map do)."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type="evil", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "configuration_evil.py").write_text(
        "import os\nopen(os.environ['EVIL_MARKER'], 'w').write('remote code ran')\n"
        "from transformers import Qwen2Config\n\n\nclass EvilConfig(Qwen2Config):\n    model_type = 'evil'\n")
    (dest / "modeling_evil.py").write_text(
        "from transformers import Qwen2ForCausalLM\nfrom .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(Qwen2ForCausalLM):\n    config_class = EvilConfig\n")
    return dest


LOAD_WITH_TRUST = """
import sys
from lora_cli.model.load import load_model
load_model(sys.argv[1], "none", "fp32", "cpu", trust_remote_code=True)
"""


def test_remote_code_runs_only_with_trust_remote_code(tiny_model_dir, data_files, tmp_path, monkeypatch):
    model = evil_model(tiny_model_dir, tmp_path / "evil")
    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    res = invoke(*train_args(model, data_files, tmp_path / "out"))
    assert res.exit_code == 1 and "--trust-remote-code" in res.output and "Traceback" not in res.output
    assert not marker.exists()
    # the same folder with the flag: the code does run (so the refusal above was the default at work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "EVIL_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_TRUST, str(model)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "remote code ran"


def test_optimizer_state_is_loaded_with_weights_only(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_model_dir, data_files, out, "--epochs", "2")
    assert invoke(*args).exit_code == 0
    checkpoint = out / "checkpoints" / "epoch-2"
    marker = tmp_path / "unpickled"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        original = (checkpoint / name).read_bytes()
        torch.save({"state": Payload(marker)}, checkpoint / name)
        res = invoke(*args, "--resume-from", checkpoint)
        assert res.exit_code == 1 and "cannot be read" in res.output and "Traceback" not in res.output, name
        assert not marker.exists(), name
        (checkpoint / name).write_bytes(original)
    # the real files load: the finished run continued from that checkpoint by one more epoch
    assert invoke(*args, "--epochs", "3", "--resume-from", checkpoint).exit_code == 0


def test_no_token_or_secret_is_written_anywhere(tiny_model_dir, data_files, tmp_path, monkeypatch):
    secrets = {"HF_TOKEN": "hf_SeCrEt0token0value1", "HUGGING_FACE_HUB_TOKEN": "hf_SeCrEt0token0value2",
               "WANDB_API_KEY": "SeCrEt0wandb0key3", "OPENAI_API_KEY": "sk-SeCrEt0key4"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert invoke(*train_args(tiny_model_dir, data_files, out, "--val", data_files[1], "--epochs", "2")).exit_code == 0
    assert invoke("package", out, "-o", tmp_path / "a.zip").exit_code == 0
    blobs = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".jsonl"]
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        blobs += [zf.read(n) for n in zf.namelist()]
    assert len(blobs) > 20
    for value in secrets.values():
        assert not any(value.encode() in blob for blob in blobs), value
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["model"]["trust_remote_code"] is False
    assert not [k for k in keys(saved) if re.search(r"(^|_)(token|secret|api_key|password)$", k.lower())]


def keys(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield str(k)
            yield from keys(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from keys(v)
