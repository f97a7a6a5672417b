"""An adapter's config against its weights: every reader names the disagreement before anything loads."""

import hashlib
import json
import shutil
import zipfile

import pytest
from helpers.adapter_factory import make_adapter, peaked_model_dir
from helpers import write_jsonl
from typer.testing import CliRunner

from lora_cli.adapter import consistency, packaging
from lora_cli.adapter.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_settings
from lora_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A real adapter (rank 8 on q_proj and v_proj, lora-cli's defaults for the tiny config)."""
    return make_adapter(tmp_path_factory, peaked_model_dir(tmp_path_factory, tiny_model_dir), "stopper")


def _copy_with(trained, tmp_path, **edits):
    folder = tmp_path / "adapter"
    shutil.copytree(trained, folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(edits)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder


def _header(**tensors):
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in tensors.items()}


Q = "base_model.model.model.layers.0.self_attn.q_proj"
K = "base_model.model.model.layers.0.self_attn.k_proj"


def test_the_trained_adapter_agrees_with_its_config(trained):
    assert lora_settings(trained).r > 0  # reading it checks it: no error
    config = json.loads((trained / ADAPTER_CONFIG).read_text())
    with open(trained / ADAPTER_WEIGHTS, "rb") as fh:
        assert consistency.mismatch(config, consistency.read_header(fh, "w")) is None


def test_every_reader_refuses_a_config_whose_rank_is_not_the_weights_in_one_line(trained, tmp_path):
    rank = json.loads((trained / ADAPTER_CONFIG).read_text())["r"]
    folder = _copy_with(trained, tmp_path, r=rank * 2)
    data = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "hi", "output": "there"}])
    commands = {
        "param-report": ["param-report", str(folder)],
        "package": ["package", str(folder), "-o", str(tmp_path / "a.zip")],
        "generate": ["generate", "--adapter", str(folder), "Name three colors."],
        "eval": ["eval", "--adapter", str(folder), "--data", str(data), "--loss-only"],
        "merge": ["merge", "--adapter", str(folder), "-o", str(tmp_path / "merged")],
        "chat": ["chat", "--adapter", str(folder)],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, argv in commands.items():
        res = runner.invoke(app, argv, input="")
        assert res.exit_code == 1, (name, res.output)
        first = res.output.strip().splitlines()[0]
        assert first.startswith(f"error: {folder / ADAPTER_CONFIG} does not describe"), (name, first)
        assert f"r={rank * 2}" in first and f"rank {rank}" in first and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no zip, no merged folder


def test_weights_for_a_module_the_config_does_not_target_are_named():
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    header = _header(**{f"{Q}.lora_A.weight": [4, 64], f"{Q}.lora_B.weight": [64, 4],
                        f"{K}.lora_A.weight": [4, 64], f"{K}.lora_B.weight": [32, 4]})
    assert "LoRA for k_proj, which its target_modules (q_proj, v_proj) does not name" in consistency.mismatch(config, header)
    assert consistency.mismatch({**config, "target_modules": ["q_proj", "k_proj"]}, header) is None
    assert consistency.mismatch({**config, "target_modules": r".*\.(q_proj|k_proj)"}, header) is None


def test_rank_pattern_embeddings_and_dora_are_read_as_peft_writes_them():
    config = {"r": 4, "target_modules": ["q_proj", "embed_tokens"], "rank_pattern": {"q_proj": 8}}
    header = _header(**{f"{Q}.lora_A.weight": [8, 64], f"{Q}.lora_B.weight": [64, 8],
                        "base_model.model.model.embed_tokens.lora_embedding_A": [4, 400],
                        "base_model.model.model.embed_tokens.lora_embedding_B": [64, 4]})
    assert consistency.mismatch(config, header) is None
    assert "rank 8" in consistency.mismatch({**config, "rank_pattern": {}}, header)
    with_dora = {**header, f"{Q}.lora_magnitude_vector": {"dtype": "F32", "shape": [64], "data_offsets": [0, 0]}}
    assert "use_dora=False" in consistency.mismatch(config, with_dora)
    assert consistency.mismatch({**config, "use_dora": True}, with_dora) is None


def _repack(src, dest, config: dict):
    """`src` with another adapter_config.json and a manifest recomputed to match: intact as a zip."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        manifest = json.loads(zin.read(packaging.MANIFEST))
        for name in zin.namelist():
            if name == packaging.MANIFEST:
                continue
            data = json.dumps(config).encode() if name == ADAPTER_CONFIG else zin.read(name)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            zout.writestr(name, data)
        zout.writestr(packaging.MANIFEST, json.dumps(manifest))


def test_verify_catches_a_zip_whose_files_match_the_manifest_but_not_each_other(trained, tmp_path):
    good = tmp_path / "good.zip"
    assert runner.invoke(app, ["package", str(trained), "-o", str(good)]).exit_code == 0
    assert runner.invoke(app, ["package", "--verify", str(good)]).exit_code == 0
    config = json.loads((trained / ADAPTER_CONFIG).read_text())
    bad = tmp_path / "bad.zip"
    _repack(good, bad, {**config, "r": config["r"] * 2})
    res = runner.invoke(app, ["package", "--verify", str(bad)])
    assert res.exit_code == 1 and "not a usable adapter" in res.output and f"r={config['r'] * 2}" in res.output
    report = json.loads(runner.invoke(app, ["package", "--verify", str(bad), "--json"]).stdout)
    assert not report["ok"] and not report["changed"] and "does not describe" in report["config_mismatch"]
    res = runner.invoke(app, ["generate", "--adapter", str(bad), "hi"])
    assert res.exit_code == 1 and "does not describe" in res.output.splitlines()[0]
