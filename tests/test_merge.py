"""merge: the merged model is base + adapter (logits match), loads without peft, and lands atomically."""

import json

import pytest
import torch
from helpers.adapter_factory import make_adapter, peaked_model_dir
from typer.testing import CliRunner

from lora_cli.adapter.folder import read_adapter
from lora_cli.adapter.merging import merge
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError
from lora_cli.infer.generation import load_for_inference

runner = CliRunner()
IDS = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 33, 120]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    return peaked_model_dir(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def fp32_adapter(tmp_path_factory, model_dir):
    return make_adapter(tmp_path_factory, model_dir, "stopper")


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, model_dir):
    return make_adapter(tmp_path_factory, model_dir, "nf4-stopper", epochs=3, **{"model.quantization": "nf4"})


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def peft_logits(adapter, use_adapter=True, quantization=None) -> torch.Tensor:
    loaded = load_for_inference(read_adapter(adapter), quantization=quantization, precision="fp32", device="cpu")
    if use_adapter:
        return logits_of(loaded.model)
    with loaded.model.disable_adapter():
        return logits_of(loaded.model)


def plain_load(folder):
    """The merged folder through plain transformers: no peft, no lora-cli."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    AutoTokenizer.from_pretrained(str(folder))
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert getattr(model.config, "quantization_config", None) is None
    return model.float()


def test_fp32_merge_reproduces_base_plus_adapter(fp32_adapter, tmp_path):
    result = merge(read_adapter(fp32_adapter), tmp_path / "merged", dtype="fp32")
    merged, reference = logits_of(plain_load(tmp_path / "merged")), peft_logits(fp32_adapter)
    base = peft_logits(fp32_adapter, use_adapter=False)
    assert (reference - base).abs().max() > 1.0  # the adapter matters, so a match means it was merged
    assert torch.allclose(merged, reference, atol=1e-4, rtol=1e-4)
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge_info.json"} <= set(result.files)
    assert (tmp_path / "merged" / "model.safetensors").stat().st_mode & 0o044  # readable by others, as any file
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["dtype"] == "fp32" and info["base_weights"] == "original" and info["template"] == "alpaca"


@pytest.mark.parametrize("adapted, untouched", [("lm_head", "input"), ("embed_tokens", "output")])
def test_lora_on_one_side_of_tied_embeddings_merges_into_that_side_alone(tmp_path_factory, model_dir, tmp_path,
                                                                          adapted, untouched):
    """The head and the embedding share one weight: merged in place, an update of either would reach the other."""
    adapter = make_adapter(tmp_path_factory, model_dir, adapted, epochs=1, **{"lora.target_modules": f"q_proj,{adapted}"})
    merge(read_adapter(adapter), tmp_path / "merged", dtype="fp32")
    merged, reference = plain_load(tmp_path / "merged"), peft_logits(adapter)
    assert (reference - peft_logits(adapter, use_adapter=False)).abs().max() > 1e-2
    assert torch.allclose(logits_of(merged), reference, atol=1e-4, rtol=1e-4)
    assert not merged.config.tie_word_embeddings
    from safetensors.torch import load_file

    base = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    sides = {"input": merged.get_input_embeddings().weight, "output": merged.get_output_embeddings().weight}
    changed = "output" if untouched == "input" else "input"
    assert torch.equal(sides[untouched], base) and not torch.equal(sides[changed], base)


def test_bf16_merge_matches_within_bf16_rounding(fp32_adapter, tmp_path):
    """bf16 weights = the fp32 merge rounded to bf16 (within an ulp), and logits as close as that rounding allows."""
    from safetensors.torch import load_file

    merge(read_adapter(fp32_adapter), tmp_path / "bf16", dtype="bf16")
    merge(read_adapter(fp32_adapter), tmp_path / "fp32", dtype="fp32")
    w16, w32 = load_file(str(tmp_path / "bf16" / "model.safetensors")), load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert w16.keys() == w32.keys() and {t.dtype for t in w16.values()} == {torch.bfloat16}
    for name, t in w32.items():
        assert torch.allclose(w16[name].float(), t, rtol=2**-7, atol=2**-8 * float(t.abs().max())), name
    reference = peft_logits(fp32_adapter)
    merged = logits_of(plain_load(tmp_path / "bf16"))
    rounded = plain_load(tmp_path / "fp32")
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in w32.items()}, strict=False)
    rounding = (logits_of(rounded) - reference).abs().max()
    assert 0 < (merged - reference).abs().max() <= 2 * rounding + 1e-3
    assert (merged.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75


def test_nf4_base_weights_reproduce_the_qlora_model(nf4_adapter, tmp_path):
    reference = peft_logits(nf4_adapter)  # loaded in 4-bit, as it was trained
    merge(read_adapter(nf4_adapter), tmp_path / "from-nf4", dtype="fp32", base_weights="nf4")
    merge(read_adapter(nf4_adapter), tmp_path / "original", dtype="fp32", base_weights="original")
    from_nf4 = logits_of(plain_load(tmp_path / "from-nf4"))
    original = logits_of(plain_load(tmp_path / "original"))
    assert torch.allclose(from_nf4, reference, atol=1e-3, rtol=1e-3)
    assert (original - reference).abs().max() > 10 * (from_nf4 - reference).abs().max()  # 4-bit rounding differs
    assert torch.allclose(original, peft_logits(nf4_adapter, quantization="none"), atol=1e-4, rtol=1e-4)


def test_merge_and_export_default_to_the_weights_the_adapter_was_trained_against(nf4_adapter, fp32_adapter,
                                                                              tmp_path):
    reference = peft_logits(nf4_adapter)  # base + adapter as generate and eval run it: the base in 4-bit
    res = runner.invoke(app, ["merge", "-a", str(nf4_adapter), "-o", str(tmp_path / "merged"), "--dtype", "fp32",
                              "--json"])
    assert res.exit_code == 0, res.output
    merged_default = json.loads(res.stdout)["base_weights"]
    res = runner.invoke(app, ["export", "-a", str(nf4_adapter), "-o", str(tmp_path / "m.gguf"), "--json"])
    assert res.exit_code == 0, res.output
    assert merged_default == json.loads(res.stdout)["base_weights"] == "nf4"
    assert torch.allclose(logits_of(plain_load(tmp_path / "merged")), reference, atol=1e-3, rtol=1e-3)
    # an adapter trained on the unquantized base: both take the original weights
    assert merge(read_adapter(fp32_adapter), tmp_path / "fp32", dtype="fp32").base_weights == "original"
    res = runner.invoke(app, ["merge", "-a", str(nf4_adapter), "-o", str(tmp_path / "orig"), "--dtype", "fp32",
                              "--base-weights", "original", "--json"])  # still a choice
    assert res.exit_code == 0 and json.loads(res.stdout)["base_weights"] == "original"
    assert (logits_of(plain_load(tmp_path / "orig")) - reference).abs().max() > 1e-2


def test_output_folder_rules(fp32_adapter, tmp_path):
    info = read_adapter(fp32_adapter)
    with pytest.raises(LoraCliError, match="into the adapter folder"):
        merge(info, fp32_adapter / "merged")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraCliError, match="is a file"):
        merge(info, tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LoraCliError, match="even with --force"):
        merge(info, mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    merge(info, tmp_path / "empty", dtype="fp32")  # an empty folder is fine
    with pytest.raises(LoraCliError, match="already exists"):
        merge(info, tmp_path / "empty")
    merge(info, tmp_path / "empty", dtype="bf16", force=True)
    assert json.loads((tmp_path / "empty" / "merge_info.json").read_text())["dtype"] == "bf16"


def test_a_failed_merge_leaves_nothing_behind(fp32_adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(LoraCliError, match="No space left"):
        merge(read_adapter(fp32_adapter), tmp_path / "merged", dtype="fp32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["merge", "-a", "{adapter}"], "No output folder given"),
    (["merge", "-a", "{adapter}", "-o", "{tmp}/m", "--dtype", "int8"], "--dtype must be one of bf16, fp16, fp32"),
    (["merge", "-a", "{adapter}", "-o", "{tmp}/m", "--base-weights", "gguf"], "--base-weights must be one of"),
    (["merge", "-a", "{tmp}/nope", "-o", "{tmp}/m"], "does not exist"),
    (["merge", "-a", "{tmp}", "-o", "{tmp}/m"], "is not an adapter folder"),
])
def test_cli_merge_bad_inputs(args, message, fp32_adapter, tmp_path):
    fill = {"adapter": str(fp32_adapter), "tmp": str(tmp_path)}
    res = runner.invoke(app, [a.format(**fill) for a in args])
    assert res.exit_code == 1 and message.format(**fill) in res.output and "Traceback" not in res.output


def test_cli_merge_writes_and_refuses_to_overwrite(fp32_adapter, tmp_path):
    res = runner.invoke(app, ["merge", "-a", str(fp32_adapter), "-o", str(tmp_path / "m"), "--dtype", "fp16"])
    assert res.exit_code == 0, res.output
    assert "fp16" in res.output and "AutoModelForCausalLM.from_pretrained" in res.output
    assert plain_load(tmp_path / "m") is not None
    res = runner.invoke(app, ["merge", "-a", str(fp32_adapter), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "--force" in res.output


def test_a_merged_folder_prompts_as_training_did_in_transformers_and_in_lora_cli(tmp_path_factory, model_dir, tmp_path):
    """Its chat template is the training template (apply_chat_template gives training's prompt tokens),
    and lora-cli prompts it with that template without being told (merge_info.json)."""
    from transformers import AutoTokenizer

    from lora_cli.adapter.folder import base_model_info, load_template
    from lora_cli.data.chat_template import user_content
    from lora_cli.data.records import Example
    from lora_cli.data.tokenization import encode_example_prompt
    from lora_cli.infer.evaluation import response_loss

    template_file = tmp_path_factory.mktemp("template") / "qa.txt"
    template_file.write_text("Q: {instruction}\nContext: {input}\nA: {output}")
    adapter = make_adapter(tmp_path_factory, model_dir, "file-template", epochs=1, **{"data.template": str(template_file)})
    merge(read_adapter(adapter), tmp_path / "merged", dtype="fp32")
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["chat_template"] == "training"
    tok, template = AutoTokenizer.from_pretrained(str(tmp_path / "merged")), load_template(read_adapter(adapter))
    assert tok.chat_template != AutoTokenizer.from_pretrained(str(model_dir)).chat_template
    for ex in (Example(0, "name a fruit", "a red one", ""), Example(0, "name a color", "", "")):
        message = [{"role": "user", "content": user_content(template, ex.instruction, ex.input)}]
        got = tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert list(got) == encode_example_prompt(ex, tok, template)

    info = base_model_info(str(tmp_path / "merged"))
    assert info.template_text == template_file.read_text() and "merged model" in info.notes[0]
    records = [Example(i + 1, f"item {i}", "ctx", "yes") for i in range(4)]
    merged = response_loss(load_for_inference(info, "none", "fp32", "cpu", with_adapter=False), records)
    reference = response_loss(load_for_inference(read_adapter(adapter), "none", "fp32", "cpu"), records)
    assert merged.n == reference.n and abs(merged.total - reference.total) < 1e-3 * reference.n
