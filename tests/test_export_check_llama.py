"""The export check in llama.cpp (llama-cpp-python, the runtime extra; `make test-runtime` installs it): every
format and weight type lora-cli writes, run in llama.cpp, against the trained tiny model (base + adapter, as eval
loads it). Skipped, with the reason, where llama-cpp-python is not installed."""

import shutil

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the runtime extra; make test-runtime)")

from helpers.export import adapter, model_dir  # noqa: E402
from test_export_check import examples, run_check, trained_side  # noqa: E402

from lora_cli.adapter.folder import read_adapter  # noqa: E402
from lora_cli.export.check_artifact import open_artifact  # noqa: E402
from lora_cli.export.check_runtimes import LlamaCppRuntime  # noqa: E402
from lora_cli.export.runner import export  # noqa: E402

ARCHS = ["llama", "qwen2"]
pytestmark = pytest.mark.slow  # the export matrix in llama.cpp (make test-runtime runs it)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    return {arch: adapter(tmp_path_factory, tiny_model_dir, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def trained(adapters):
    return {arch: trained_side(path) for arch, path in adapters.items()}


def llama(artifact) -> LlamaCppRuntime:
    return LlamaCppRuntime(artifact.model_file, artifact.lora_file, n_ctx=512, threads=2)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_gguf_in_llama_cpp_gets_the_training_prompt_tokens_and_agrees_as_its_weight_type_allows(
        arch, outtype, adapters, trained, tmp_path):
    export(read_adapter(adapters[arch]), tmp_path / "model.gguf", "gguf", outtype)
    artifact = open_artifact(tmp_path / "model.gguf")
    report = run_check(artifact, llama(artifact), trained[arch], max_new_tokens=8)
    assert report.prompts_identical == report.records, report.reasons  # the template, the BOS, the tokenizer
    assert not [r for r in report.reasons if r.kind in ("template", "BOS", "tokenizer", "eos")], report.reasons
    # A tiny random model has many near-tied logits: 16-bit and 8-bit rounding flips some argmaxes (as in
    # transformers, test_export_gguf). f32 is the merge itself; llama.cpp keeps its KV cache in f16 (measured
    # 0.35% of the largest logit on the tiny llama).
    assert report.agreement >= (0.99 if outtype == "f32" else 0.75), report.agreement
    if outtype == "f32":
        assert report.verdict == "pass" and report.max_logit_diff < 0.01, (report.reasons, report.max_logit_diff)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_ollama_export_in_llama_cpp_passes_and_a_broken_one_fails_naming_the_reason(arch, adapters, trained,
                                                                                      tmp_path):
    export(read_adapter(adapters[arch]), tmp_path / "ollama", "ollama", "f32")
    artifact = open_artifact(tmp_path / "ollama")
    runtime = llama(artifact)
    report = run_check(artifact, runtime, trained[arch], max_new_tokens=8)
    assert report.verdict == "pass", report.reasons
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ollama", broken)
    text = (broken / "Modelfile").read_text(encoding="utf-8")
    (broken / "Modelfile").write_text(text.replace("### Response:\n", ""), encoding="utf-8")
    report = run_check(open_artifact(broken), runtime, trained[arch], max_new_tokens=8)
    assert report.verdict == "fail" and report.reasons[0].kind == "template"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_gguf_lora_adapter_on_the_base_gguf_in_llama_cpp_reproduces_the_trained_model(arch, adapters, trained,
                                                                                      tmp_path, tiny_model_dir,
                                                                                      tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_cli.export.architecture import check_config
    from lora_cli.export.gguf_model import write_model_gguf
    from lora_cli.model.load import load_tokenizer

    folder = model_dir(tmp_path_factory, tiny_model_dir, arch)  # the base the adapter was trained on
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    spec = check_config(AutoConfig.from_pretrained(str(folder)), arch)
    write_model_gguf(tmp_path / "base.gguf", base, load_tokenizer(folder), spec, "f32", "", {"name": "base"})
    export(read_adapter(adapters[arch]), tmp_path / "adapter.gguf", "gguf-lora", "f32")
    artifact = open_artifact(tmp_path / "adapter.gguf", tmp_path / "base.gguf")
    assert (artifact.kind, artifact.lora_file) == ("gguf-lora", tmp_path / "adapter.gguf")
    report = run_check(artifact, llama(artifact), trained[arch], max_new_tokens=8)
    assert report.verdict == "pass", report.reasons
    assert report.prompts_identical == report.records == len(examples()) and report.agreement >= 0.99


def test_export_with_check_writes_the_export_then_prints_the_verdict_and_its_json_report(adapters, tmp_path):
    import json

    from typer.testing import CliRunner

    from lora_cli.cli.app import app

    res = CliRunner().invoke(app, ["export", "--adapter", str(adapters["llama"]), "-f", "ollama", "--outtype", "f32",
                                   "-o", str(tmp_path / "ollama"), "--check"])
    assert res.exit_code == 0, res.output
    assert "Wrote" in res.output and "prompt tokens identical" in res.output and "PASS" in res.output
    assert (tmp_path / "ollama" / "Modelfile").is_file()
    report = json.loads((tmp_path / "ollama.check.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "pass" and report["runtime"].startswith("llama.cpp")
