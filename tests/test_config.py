"""The run config: seed-recipe defaults, file < --set < flags precedence, self-validation."""

import pytest

from lora_cli.adapter.folder import run_fingerprint
from lora_cli.config import RunConfig
from lora_cli.config_files import build_config
from lora_cli.errors import LoraCliError


def test_defaults_are_the_seed_recipe():
    c = RunConfig()
    assert c.model.name == "Qwen/Qwen2.5-1.5B-Instruct" and c.model.quantization == "nf4"
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules, c.lora.bias) == (
        16, 32, 0.05, ["q_proj", "v_proj"], "none")
    assert (c.train.epochs, c.train.batch_size, c.train.eval_batch_size, c.train.grad_accum, c.train.lr) == (
        3, 2, 2, 2, 2e-4)
    assert c.data.max_length == 512 and c.train.log_every == 10 and c.output.dir == "adapters"


def test_file_then_set_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 5\nlora:\n  r: 8\n")
    cfg = build_config(str(path), ["train.epochs=7", "lora.target_modules=q_proj,k_proj"], {"train.lr": 3e-4, "lora.r": None})
    assert cfg.train.lr == 3e-4  # flag wins over file
    assert cfg.train.epochs == 7  # --set wins over file
    assert cfg.lora.r == 8  # file wins over default; a None flag means "not given"
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]


def test_round_trip_through_yaml(tmp_path):
    cfg = RunConfig().replace({"train.lr": 1e-3, "data.template": "chat"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert build_config(path, None, {}) == cfg


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lr: -1\n", "train.lr"),
    ("train:\n  precision: fp8\n", "train.precision"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("bogus:\n  x: 1\n", "unknown section"),
    ("train:\n  learning_rate: 1\n", "unknown key"),
    ("train: [1, 2\n", "not valid YAML"),
    ("model:\n  quantization: int3\n", "model.quantization"),
])
def test_bad_config_files_name_the_setting(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LoraCliError) as info:
        build_config(path, None, {})
    assert needle in str(info.value)


def test_unknown_set_key_and_missing_file(tmp_path):
    with pytest.raises(LoraCliError, match="Unknown setting"):
        build_config(None, ["train.nope=1"], {})
    with pytest.raises(LoraCliError, match="section.key=value"):
        build_config(None, ["lr=1"], {})
    with pytest.raises(LoraCliError, match="does not exist"):
        build_config(tmp_path / "missing.yaml", None, {})


def test_fingerprint_ignores_output_but_not_settings():
    a = RunConfig()
    assert run_fingerprint(a) == run_fingerprint(a.replace({"output.dir": "elsewhere"}))
    assert run_fingerprint(a) == run_fingerprint(a.replace({"train.log_every": 3}))  # logging changes no result
    assert run_fingerprint(a) != run_fingerprint(a.replace({"train.lr": 1e-3}))


@pytest.mark.parametrize("override", [{"train.seed": 2**70}, {"train.seed": -1}, {"train.epochs": 10**30}])
def test_out_of_range_numbers_are_config_errors(override):
    with pytest.raises(LoraCliError, match="must be"):
        RunConfig().replace(override)


def test_an_unknown_set_key_suggests_the_settings_it_may_have_meant():
    with pytest.raises(LoraCliError) as err:
        RunConfig().replace({"train.warmup": 10})
    assert "Unknown setting 'train.warmup'. Did you mean train.warmup_steps, train.warmup_ratio?" in str(err.value)
    with pytest.raises(LoraCliError) as err:
        RunConfig().replace({"lora.rank": 8})
    assert "lora.r" in str(err.value)


@pytest.mark.parametrize("override, says", [
    ({"train.epochs": 0}, "Invalid config value train.epochs=0 (--epochs): must be > 0."),
    ({"lora.r": 0}, "Invalid config value lora.r=0 (--lora-r): must be > 0."),
    ({"data.add_eos": "maybe"}, "(--add-eos)"),  # a bool flag: its on side
])
def test_a_bad_value_names_the_flag_a_user_typed_beside_its_config_key(override, says):
    with pytest.raises(LoraCliError) as err:
        RunConfig().replace(override)
    assert says in str(err.value)
