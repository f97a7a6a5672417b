"""LoRA goes where --target-modules says, and trains there: every name checked against the model
before any weight loads, all-linear expanded inside a list, and LoRA on the output head in the
loss's graph (the fused loss would compute logits from the head's weight and bypass it)."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import tiny_config
from safetensors.torch import load_file
from tiny_models import build_model
from typer.testing import CliRunner

from lora_cli import faults
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError
from lora_cli.progress import NullReporter
from lora_cli.train.recipe import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


class RecordingReporter(NullReporter):
    def __init__(self):
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


@pytest.fixture(scope="module")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    """conftest's tiny model with its own lm_head weight (not the input embedding's)."""
    folder = tmp_path_factory.mktemp("untied")
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("model", "config")):
            shutil.copy(f, folder / f.name)
    build_model(folder, 400, tied=False)
    return folder


def param_report(*args):
    res = runner.invoke(app, ["param-report", *[str(a) for a in args]])
    return res


@pytest.mark.parametrize("targets, tied", [("q_proj,lm_head", True), ("q_proj,lm_head", False), ("lm_head", True),
                                           ("all-linear", True), ("all-linear,lm_head", True)])
def test_every_trainable_tensor_changes_after_a_few_steps(tiny_model_dir, untied_model_dir, data_files, tmp_path,
                                                          targets, tied):
    before, params = {}, {}

    def begin(loop):
        before.update({n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad})
        params.update(loop.model.named_parameters())
        return loop

    out = tmp_path / "adapter"
    cfg = tiny_config(tiny_model_dir if tied else untied_model_dir, data_files[0], None, out, epochs=1, max_steps=4,
                      lr=1e-2, scheduler="constant", max_tokens=128, eval_at_start=False)
    reporter = RecordingReporter()
    with faults.inject("train:begin", begin):
        result = train(cfg.replace({"model.quantization": "none", "lora.target_modules": targets}), reporter=reporter)
    assert before and all(not torch.equal(before[n], params[n]) for n in before), \
        [n for n in before if torch.equal(before[n], params[n])]
    assert result.summary.last_loss < result.summary.first_loss
    on_head = "lm_head" in targets
    assert any(".lm_head." in n for n in before) == on_head  # all-linear alone leaves the head out (peft's rule)
    assert any("lm_head.lora_B" in k for k in load_file(str(out / "adapter_model.safetensors"))) == on_head
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["run"]["fused_loss"] is (not on_head)
    said = [m for m in reporter.messages if "fused loss" in m]
    assert said == (["Loss from full logits, not the fused loss: LoRA on the output head lm_head, which the fused "
                     "loss would bypass."] if on_head else [])
    if targets.startswith("all-linear"):
        names = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert linear <= {n.rsplit(".", 1)[-1] for n in names}


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft: about merging, not scoring
def test_evaluation_scores_through_lora_on_the_head(tiny_model_dir):
    """token_losses follows the training rule: a LoRA'd head gets full logits, not its base weight."""
    import torch.nn.functional as F

    from lora_cli.config import LoraSettings
    from lora_cli.model.load import attach_lora, load_model, prepare_for_training
    from lora_cli.model.loss import IGNORE, token_losses

    model = load_model(tiny_model_dir, "none", "fp32", "cpu")
    prepare_for_training(model, False, False, 0)
    peft_model = attach_lora(model, LoraSettings(target_modules=["lm_head"], dropout=0.0))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ids = torch.randint(3, 400, (2, 12))
    mask = torch.ones_like(ids)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = IGNORE
    with torch.no_grad():
        losses, _ = token_losses(peft_model.get_base_model(), ids, mask, targets)
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
        expected = F.cross_entropy(logits[targets != IGNORE], targets[targets != IGNORE], reduction="none")
        with peft_model.disable_adapter():
            without, _ = token_losses(peft_model.get_base_model(), ids, mask, targets)
    assert torch.allclose(losses, expected, atol=1e-5)
    assert not torch.allclose(losses, without, atol=1e-3)  # the head's LoRA counts


def test_a_typo_beside_a_good_name_is_refused_before_anything_loads(tiny_model_dir, data_files, tmp_path, monkeypatch):
    from lora_cli.model import load

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the target modules were checked")

    monkeypatch.setattr(load, "load_model", no_weights)
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(data_files[0]), "-o",
                              str(tmp_path / "a"), "--target-modules", "q_proj,v_prj", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert f"--target-modules: 'v_prj' is not a module of {tiny_model_dir} (did you mean 'v_proj'?)" in text
    assert f"The linear layers of {tiny_model_dir}: {LINEAR}; or all-linear" in text
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # nothing tokenized or written
    with pytest.raises(LoraCliError, match="'query_key_value' is not a module"):
        train(tiny_config(tiny_model_dir, data_files[0], None, tmp_path / "b").replace(
            {"lora.target_modules": "query_key_value"}))


@pytest.mark.parametrize("targets, says", [
    ("W_pack", "'W_pack' is not a module of"),
    ("all_linear", "'all_linear' is not a module of {model} (did you mean 'all-linear'?)"),
    ("q_proj,mlp", "'mlp' names model.layers.0.mlp, a Qwen2MLP, which LoRA cannot adapt; its linear layers are "
                   "gate_proj, up_proj, down_proj"),
])
def test_param_report_names_every_bad_target_with_the_models_linear_layers(tiny_model_dir, targets, says):
    res = param_report("--model", tiny_model_dir, "--target-modules", targets)
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and says.format(model=tiny_model_dir) in text and LINEAR in text, text


def test_all_linear_inside_a_list_is_expanded_not_dropped(tiny_model_dir):
    def trainable(targets):
        res = param_report("--model", tiny_model_dir, "--target-modules", targets, "--json")
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["trainable"]

    alone, head = trainable("all-linear"), trainable("lm_head")
    assert trainable("ALL-LINEAR") == alone  # peft's shorthand is case-blind: so is the check
    assert trainable("all-linear,lm_head") == alone + head > alone
    assert trainable("lm_head,all-linear,q_proj") == alone + head
