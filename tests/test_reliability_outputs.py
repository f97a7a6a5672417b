"""Nothing a user had is replaced by accident: --overwrite for another run's folder, zips checked
against their manifest, and no unpacking outside the target folder."""

import hashlib
import json
import zipfile

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_cli.adapter import packaging
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_into_another_runs_folder_needs_overwrite(tiny_model_dir, data_files, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "adapters"
    base = ["train", "--model", tiny_model_dir, "--train", data_files[0], "-o", out, "--epochs", "1",
            "--max-steps", "2", "--precision", "fp32", "--device", "cpu", "--quantization", "none",
            "--max-length", "64"]
    try:
        assert invoke(*base).exit_code == 0
        before = snapshot(out)
        res = invoke(*base, "--lora-r", "4")
        assert res.exit_code == 1 and "holds a different run (lora.r: 16 there, 4 now)" in res.output
        assert "--overwrite" in res.output and snapshot(out) == before  # not a byte changed
        assert invoke(*base, "--lora-r", "4", "--overwrite").exit_code == 0
        assert yaml.safe_load((out / "run_config.yaml").read_text())["lora"]["r"] == 4
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep me")
        res = invoke(*base[:6], mine, *base[7:], "--overwrite")
        assert res.exit_code == 1 and "not written by lora-cli" in res.output
        assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def good_zip(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights" * 64)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "m"}))
    dest = tmp_path / "good.zip"
    packaging.package(folder, dest)
    return dest


def with_members(src, dest, extra: list[tuple[str, bytes]]):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        for name, data in extra:
            zout.writestr(name, data)
    return dest


UNSAFE = ["../escape.txt", "../../escape.txt", "/tmp/escape.txt", "..\\..\\escape.txt", "C:/escape.txt",
          "a/../../escape.txt"]


@pytest.mark.parametrize("name", UNSAFE)
def test_verify_reports_and_extract_refuses_paths_that_escape(good_zip, tmp_path, name):
    evil = with_members(good_zip, tmp_path / "evil.zip", [(name, b"pwned")])
    res = invoke("package", "--verify", evil, "--json")
    assert res.exit_code == 1 and name in json.loads(res.stdout)["unsafe"]
    res = invoke("package", "--verify", evil)
    assert res.exit_code == 1 and "unsafe path" in res.output
    target = tmp_path / "deep" / "er" / "unpacked"
    with pytest.raises(LoraCliError, match="escape"):
        packaging.extract(evil, target)
    assert not target.exists()
    assert [p for p in tmp_path.rglob("escape.txt")] == []


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_name_stored_twice_is_not_intact(good_zip, tmp_path):
    """Only one copy can be hashed, but an unpacker may write either: the zip is not what was verified."""
    doubled = with_members(good_zip, tmp_path / "doubled.zip", [("adapter_config.json", b'{"evil": 1}')])
    res = invoke("package", "--verify", doubled, "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["extra"] == ["adapter_config.json (stored 2 times)"]
    assert invoke("package", "--verify", good_zip).exit_code == 0
