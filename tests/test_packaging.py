"""package: the zip holds what the manifest says; --verify catches changes; zip-slip refused."""

import hashlib
import json
import zipfile

import pytest
from typer.testing import CliRunner

from lora_cli.adapter import packaging
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError

runner = CliRunner()


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapters"
    (folder / "checkpoints" / "epoch-1").mkdir(parents=True)
    (folder / "checkpoints" / "epoch-1" / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights" * 50)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m", "r": 16}))
    (folder / "param_summary.json").write_text(json.dumps({"total": 100, "trainable": 5, "modules": [
        {"module": "model.layers.*.self_attn.q_proj.lora_A", "count": 2, "params": 4, "trainable": 4}]}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_zip_matches_manifest_and_leaves_out_checkpoints(adapter, tmp_path):
    dest = tmp_path / "adaptermodel.zip"
    res = runner.invoke(app, ["package", str(adapter), "-o", str(dest)])
    assert res.exit_code == 0, res.output
    assert "trainable" in res.output and str(dest) in res.output
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MANIFEST.json"))
        assert names == {"MANIFEST.json", "adapter_model.safetensors", "adapter_config.json", "param_summary.json",
                         "tokenizer.json"}
        assert manifest["base_model"] == "smollm2-135m" and manifest["lora_cli_version"]
        for name, meta in manifest["files"].items():
            data = zf.read(name)
            assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]
    assert runner.invoke(app, ["package", "--verify", str(dest)]).exit_code == 0


def test_package_prints_the_summary_and_the_zip_not_the_per_module_table(adapter, tmp_path):
    dest = tmp_path / "adaptermodel.zip"
    res = runner.invoke(app, ["package", str(adapter), "-o", str(dest)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout
    assert "5 trainable of 100 parameters (5.0000%)" in lines[0] and f"param-report {adapter}" in lines[0]
    assert lines[1].startswith(f"Wrote {dest} (")
    assert "q_proj" not in res.output and "Per module" not in res.output


def test_refuses_to_overwrite_without_force(adapter, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"precious")
    res = runner.invoke(app, ["package", str(adapter), "-o", str(dest)])
    assert res.exit_code == 1 and "--force" in res.output and dest.read_bytes() == b"precious"
    assert runner.invoke(app, ["package", str(adapter), "-o", str(dest), "--force"]).exit_code == 0
    assert zipfile.is_zipfile(dest)


def _rewrite(src, dest, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            new = change(info.filename, data)
            if new is not None:
                zout.writestr(info.filename, new)
        extra = change("__extra__", None)
        if extra is not None:
            zout.writestr(*extra)


@pytest.mark.parametrize("kind, change", [
    ("changed", lambda n, d: (d + b"!") if n == "tokenizer.json" else (d if n != "__extra__" else None)),
    ("missing", lambda n, d: None if n in ("tokenizer.json", "__extra__") else d),
    ("extra", lambda n, d: ("evil.py", b"print(1)") if n == "__extra__" else d),
])
def test_verify_reports_changed_missing_and_extra(adapter, tmp_path, kind, change):
    good = tmp_path / "good.zip"
    packaging.package(adapter, good)
    bad = tmp_path / "bad.zip"
    _rewrite(good, bad, change)
    res = runner.invoke(app, ["package", "--verify", str(bad), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert report[kind], report


def test_extract_refuses_paths_that_escape(adapter, tmp_path):
    good = tmp_path / "good.zip"
    packaging.package(adapter, good)
    evil = tmp_path / "evil.zip"
    _rewrite(good, evil, lambda n, d: ("../../escape.txt", b"x") if n == "__extra__" else d)
    with pytest.raises(LoraCliError, match="escape"):
        packaging.extract(evil, tmp_path / "out")
    assert not (tmp_path.parent / "escape.txt").exists()
    target = packaging.extract(good, tmp_path / "unpacked")
    assert (target / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_bad_inputs(tmp_path):
    res = runner.invoke(app, ["package", str(tmp_path / "none")])
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["package", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "is not an adapter folder" in res.output
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    res = runner.invoke(app, ["package", "--verify", str(junk)])
    assert res.exit_code == 1 and "not a readable zip" in res.output


def _damaged(src, dest, how):
    """`src` with one byte of the weights' stored data flipped, or cut in half (a copy that stopped)."""
    data = bytearray(src.read_bytes())
    if how == "truncated":
        dest.write_bytes(bytes(data[: len(data) // 2]))
        return
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("adapter_model.safetensors")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    dest.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_zip_is_refused_as_not_intact_by_every_command_that_reads_one(adapter, tmp_path, how):
    good = tmp_path / "good.zip"
    assert runner.invoke(app, ["package", str(adapter), "-o", str(good)]).exit_code == 0
    bad = tmp_path / "bad.zip"
    _damaged(good, bad, how)
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n")
    commands = [["package", "--verify"], ["generate", "hi", "--adapter"], ["chat", "--adapter"],
                ["eval", "--data", str(data), "--adapter"], ["merge", "-o", str(tmp_path / "m"), "--adapter"],
                ["export", "-o", str(tmp_path / "m.gguf"), "--adapter"]]
    for argv in commands:
        res = runner.invoke(app, [*argv, str(bad)], input="")
        assert res.exit_code == 1, (argv, res.output)
        first = res.output.strip().splitlines()[0]
        assert first.startswith(f"error: {bad} is not intact"), (argv, res.output)
        if how == "flipped":
            assert "adapter_model.safetensors" in first and "internal error" not in res.output, res.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()
