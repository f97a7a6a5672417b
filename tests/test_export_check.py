"""The export check (lora_cli/export/check.py) with both sides in transformers: the trained tiny model (base +
adapter, as eval loads it) against its export read back by transformers' GGUF loader. Always runs; the llama.cpp
side is tests/test_export_check_llama.py."""

import json
import shutil

import pytest
import torch
from helpers.export import adapter, val_records
from typer.testing import CliRunner

from lora_cli.adapter.folder import read_adapter
from lora_cli.data.records import Example
from lora_cli.errors import LoraCliError
from lora_cli.export.check import check_export, prompt_fault
from lora_cli.export.check_artifact import ollama_render, open_artifact, parse_modelfile
from lora_cli.export.check_runtimes import TransformersRuntime, gguf_transformers_runtime
from lora_cli.export.runner import export

ARCHS = ["llama", "qwen2"]  # a BOS before every text (llama) and none (qwen2)
runner = CliRunner()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir):
    """{arch: (adapter folder, ollama folder)}: f32, so the export's numbers are the merged model's."""
    out = {}
    for arch in ARCHS:
        folder = adapter(tmp_path_factory, tiny_model_dir, arch)
        target = tmp_path_factory.mktemp(f"check-{arch}") / "ollama"
        export(read_adapter(folder), target, "ollama", "f32")
        out[arch] = (folder, target)
    return out


def trained_side(adapter_folder):
    """The trained model as eval loads it (load_for_inference), as a runtime, with its tokenizer and template."""
    from lora_cli.infer.generation import load_for_inference

    loaded = load_for_inference(read_adapter(adapter_folder), precision="fp32", device="cpu")
    return TransformersRuntime(loaded.model, loaded.tokenizer, loaded.stop_ids), loaded


def examples():
    return [Example(i + 1, **row) for i, row in enumerate(val_records())]


def run_check(artifact, runtime, trained, max_new_tokens=8):
    reference, loaded = trained
    return check_export(artifact, runtime, reference, loaded.tokenizer, loaded.template, examples(),
                        add_eos=loaded.info.add_eos, max_length=loaded.info.max_length, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("kind", ["gguf", "ollama"])
@pytest.mark.parametrize("arch", ARCHS)
def test_an_exact_export_passes_with_every_prompt_token_and_nearly_every_next_token_in_agreement(arch, kind, exports):
    adapter_folder, folder = exports[arch]
    artifact = open_artifact(folder if kind == "ollama" else folder / "model.gguf")
    report = run_check(artifact, gguf_transformers_runtime(artifact.model_file), trained_side(adapter_folder))
    assert (artifact.kind, artifact.weight_type) == (kind, "F32")
    assert report.verdict == "pass", report.reasons
    assert report.prompts_identical == report.records == len(val_records())
    assert report.positions > 5 * report.records and report.agreement >= 0.99, report.agreement
    assert report.max_logit_diff < 1e-3  # fp32 on both sides: the merge's rounding only
    assert report.export_stopped == report.trained_stopped and report.answers_identical == report.records


def _edit_modelfile(folder, tmp_path, old: str, new: str):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    text = (broken / "Modelfile").read_text(encoding="utf-8")
    assert old in text
    (broken / "Modelfile").write_text(text.replace(old, new), encoding="utf-8")
    return broken


def test_a_modelfile_template_without_the_response_line_fails_naming_the_template(exports, tmp_path):
    adapter_folder, folder = exports["qwen2"]
    artifact = open_artifact(_edit_modelfile(folder, tmp_path, "### Response:\n", ""))
    report = run_check(artifact, gguf_transformers_runtime(artifact.model_file), trained_side(adapter_folder))
    assert report.verdict == "fail" and report.prompts_identical == 0
    assert [r.kind for r in report.reasons if r.level == "fail"][0] == "template"
    assert "renders other text than the training prompt" in report.reasons[0].message


def test_eos_missing_from_the_stop_parameters_is_named_and_fails_where_nothing_else_stops_on_it(exports, tmp_path):
    adapter_folder, folder = exports["qwen2"]
    trained = trained_side(adapter_folder)
    eos = trained[1].tokenizer.eos_token
    artifact = open_artifact(_edit_modelfile(folder, tmp_path, f'PARAMETER stop "{eos}"\n', ""))
    runtime = gguf_transformers_runtime(artifact.model_file)
    report = run_check(artifact, runtime, trained)
    eos_reasons = [r for r in report.reasons if r.kind == "eos"]
    assert eos_reasons and eos_reasons[0].level == "warn" and repr(eos) in eos_reasons[0].message  # GGUF eos still stops
    runtime.stop_ids = []  # a runtime that reads only the stop parameters
    report = run_check(artifact, runtime, trained)
    assert report.verdict == "fail" and {r.kind for r in report.reasons if r.level == "fail"} == {"eos"}


def test_a_gguf_runtime_that_does_not_end_on_the_trained_eos_fails_naming_the_eos(exports):
    adapter_folder, folder = exports["llama"]
    artifact = open_artifact(folder / "model.gguf")
    runtime = gguf_transformers_runtime(artifact.model_file)
    trained = trained_side(adapter_folder)
    runtime.stop_ids = [i for i in runtime.stop_ids if i != trained[1].tokenizer.eos_token_id]
    report = run_check(artifact, runtime, trained)
    assert report.verdict == "fail" and "eos" in [r.kind for r in report.reasons]


@pytest.mark.parametrize("fault", ["lost", "doubled"])
def test_a_lost_or_doubled_bos_fails_naming_the_bos(fault, exports):
    adapter_folder, folder = exports["llama"]
    artifact = open_artifact(folder if fault == "lost" else folder / "model.gguf")
    runtime = gguf_transformers_runtime(artifact.model_file)
    if fault == "lost":
        runtime.add_bos = False  # a vocabulary that does not say to add one, under a TEMPLATE without BOS text
    else:
        artifact.strip_bos_text = False  # the template's BOS text kept, and the runtime's BOS added as well
    report = run_check(artifact, runtime, trained_side(adapter_folder))
    assert report.verdict == "fail" and report.prompts_identical == 0
    assert [r.kind for r in report.reasons][0] == "BOS"


def test_an_export_whose_numbers_drift_fails_naming_the_numerics(exports):
    adapter_folder, folder = exports["qwen2"]
    artifact = open_artifact(folder / "model.gguf")
    runtime = gguf_transformers_runtime(artifact.model_file)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in runtime.model.parameters():
            param.add_(torch.randn_like(param) * param.std() * 0.5)  # what a broken quantization does
    report = run_check(artifact, runtime, trained_side(adapter_folder))
    assert report.prompts_identical == report.records
    assert report.verdict == "fail" and report.reasons[0].kind == "numerics", report.reasons
    assert report.agreement < 0.85


def test_prompt_faults_are_told_apart_bos_then_tokenizer_then_template():
    text = {(1, 5, 6): "ab", (1, 7): "ab", (1, 8): "ac", (5, 6): "ab"}.get

    def decode(ids):
        return text(tuple([1] + ids)) or text(tuple(ids))

    assert prompt_fault([1, 5, 6], [1, 5, 6], 1, decode, decode) == ""
    assert prompt_fault([1, 5, 6], [5, 6], 1, decode, decode) == "BOS"
    assert prompt_fault([1, 5, 6], [1, 1, 5, 6], 1, decode, decode) == "BOS"
    assert prompt_fault([1, 5, 6], [1, 7], 1, decode, decode) == "tokenizer"
    assert prompt_fault([1, 5, 6], [1, 8], 1, decode, decode) == "template"


def _gguf_with_types(path, file_type, matrix_types):
    """A GGUF holding one 32 x 32 matrix of each type in `matrix_types`, with `general.file_type` if given."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    for i, name in enumerate(matrix_types):
        data = np.full((32, 32), 0.5, dtype=np.float32)
        qtype = gguf.GGMLQuantizationType[name]
        writer.add_tensor(f"blk.{i}.attn_q.weight", data.astype(np.float16) if name == "F16" else
                          quantize(data, qtype), raw_dtype=None if name == "F16" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_exports_weight_type_is_its_file_type_not_its_commonest_matrix_type(tmp_path):
    import gguf

    from lora_cli.export.check_artifact import gguf_fields

    # Mostly F16 by count, as a q8_0 export that keeps some matrices in F16 could be on another model: Q8_0's target
    mixed = _gguf_with_types(tmp_path / "mixed.gguf", gguf.LlamaFileType.MOSTLY_Q8_0, ["F16", "F16", "F16", "Q8_0"])
    assert gguf_fields(mixed)["weight_type"] == "Q8_0"
    bare = _gguf_with_types(tmp_path / "bare.gguf", None, ["F16", "Q8_0", "Q8_0"])  # no file type: the commonest
    assert gguf_fields(bare)["weight_type"] == "Q8_0"


def test_the_check_renders_a_modelfile_template_as_ollama_does(exports):
    from helpers.gotemplate import ollama_render as reference_render

    _, folder = exports["llama"]
    values = dict(parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8")))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'a {{ .Prompt }} "b"'},
                    {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]
    for messages in (conversation[1:2], conversation):
        assert ollama_render(values["template"], messages) == reference_render(values["template"], messages)
    with pytest.raises(LoraCliError, match=r"uses \{\{ range .Messages \}\}"):
        ollama_render("{{ range .Messages }}{{ end }}", conversation)


def test_check_export_without_llama_cpp_says_how_to_install_it_in_one_line(exports, monkeypatch):
    import lora_cli.export.check_runtimes as runtimes
    from lora_cli.cli.app import app

    monkeypatch.setattr(runtimes, "llama_cpp_available", lambda: False)
    adapter_folder, folder = exports["qwen2"]
    res = runner.invoke(app, ["check-export", str(folder), "--adapter", str(adapter_folder)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "needs llama-cpp-python" in res.output and "pip install 'lora-cli[runtime]'" in res.output
    assert not (folder.parent / "ollama.check.json").exists()


def test_check_export_prints_the_table_and_verdict_and_writes_the_json_report_beside_the_export(exports, tmp_path):
    from lora_cli.cli.app import app

    adapter_folder, folder = exports["qwen2"]
    res = runner.invoke(app, ["check-export", str(folder), "--adapter", str(adapter_folder), "--runtime",
                              "transformers", "-n", "8"])
    assert res.exit_code == 0, res.output
    assert "prompt tokens identical" in res.output and "6/6" in res.output and "PASS" in res.output
    report = json.loads((folder.parent / "ollama.check.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "pass" and report["kind"] == "ollama" and len(report["rows"]) == 6
    broken = _edit_modelfile(folder, tmp_path, "### Response:\n", "")
    res = runner.invoke(app, ["check-export", str(broken), "--adapter", str(adapter_folder), "--runtime",
                              "transformers", "-n", "8"])
    assert res.exit_code == 1 and "FAIL" in res.output and "fail (template)" in res.output
    assert json.loads((tmp_path / "broken.check.json").read_text(encoding="utf-8"))["verdict"] == "fail"


def test_export_check_without_llama_cpp_refuses_before_writing_anything(exports, monkeypatch, tmp_path):
    import lora_cli.export.check_runtimes as runtimes
    from lora_cli.cli.app import app

    monkeypatch.setattr(runtimes, "llama_cpp_available", lambda: False)
    adapter_folder, _ = exports["qwen2"]
    res = runner.invoke(app, ["export", "--adapter", str(adapter_folder), "-o", str(tmp_path / "m.gguf"), "--check"])
    assert res.exit_code == 1 and "needs llama-cpp-python" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []
