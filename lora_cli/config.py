"""One pydantic tree describing a run; its defaults are the reference ("seed") recipe.

Every command reads the part it needs. A run can come from a YAML file (`--config`), from
flags, or from `--set section.key=value` overrides, in that order of precedence (flags win);
under all of them, `train` without --train puts the current dataset's settings (build_config).
The config a run actually used is saved beside its outputs, so it can be reproduced and so
`generate`/`eval` can render prompts exactly as training did.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_cli.errors import LoraCliError

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRACKERS = ("tensorboard", "wandb", "mlflow")
# --help panels of train's flags, in the order shown (a field's panel: its `panel`, else its section)
HELP_PANELS = {"data": "Data", "model": "Model", "lora": "LoRA", "optimisation": "Optimisation", "schedule": "Schedule",
               "evaluation": "Evaluation", "output": "Output", "speed": "Speed"}


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N (whether that device exists is device.pick_device's question)."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise LoraCliError(f"--device must be auto, cpu or cuda (or cuda:N), not {device!r}.")


def _bad(section: str, key: str, value: Any, why: str) -> LoraCliError:
    return LoraCliError(f"Invalid config value {section}.{key}={value!r}{_as_flag(section, key)}: {why}.")


def _as_flag(section: str, key: str) -> str:
    """' (--flag)': the command-line flag of a config key, so that an error names what the user typed
    whichever way the value came ("" for a key the config does not have)."""
    model = RunConfig.model_fields.get(section)  # called while validating, long after RunConfig exists
    field = model.annotation.model_fields.get(key) if model is not None else None
    # every field is a setting(): its meta is a dict
    return f" ({flag_for(key, field.json_schema_extra).split('/')[0]})" if field is not None else ""


def flag_for(name: str, meta: dict[str, Any]) -> str:
    """A setting's flag as typed: its own (`setting(flag=...)`, `--on/--off` for a bool) or its name's
    (`max_length` -> `--max-length`). The one rule, for the flags and for messages naming them."""
    return meta.get("flag") or "--" + name.replace("_", "-")


def _on_off(value: Any) -> Any:
    # YAML (and --set) read a bare on/off/true/false as a boolean; these settings spell them as words
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _comma_list(value: Any) -> Any:
    return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value


OnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]
Positive = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(ge=0, lt=1)]


def setting(default: Any = ..., help: str = "", *, flag: str | None = None, short: str | None = None,
            panel: str | None = None, **limits: Any) -> Any:
    """A config field with what its command-line flag needs: help text, and a flag name where the
    field's own name (`max_length` -> `--max-length`) would be unclear. A bool flag is written as
    `--on/--off`. `panel`: the --help panel it is listed in (one of HELP_PANELS; its section's by default).
    `limits`: pydantic's numeric bounds (gt, ge, lt, le). A mutable default (a list) is copied for each
    config, as pydantic copies every default that is not hashable."""
    meta = {"help": help, "flag": flag, "short": short, "panel": panel}
    return Field(default, description=help, json_schema_extra=meta, **limits)


class Section(BaseModel):
    """A section of the run config: unknown keys refused, numbers given as text read as numbers, text as given."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, defer_build=True)


class DataConfig(Section):
    train: str | None = setting(None, "Training data (JSONL, or a JSON array of records).")
    val: str | None = setting(None, "Validation data (same format); evaluated before training and after each epoch.")
    template: Annotated[str, Field(min_length=1)] = setting(
        "alpaca", "Prompt template: alpaca, alpaca-seed, chat, or a template file.", short="-t")
    max_length: int = setting(512, "Truncate examples to this many tokens.", ge=8)
    train_on_prompt: bool = setting(False, "Put labels on the prompt too (the seed recipe's behaviour), or on the "
                                           "response only.", flag="--train-on-prompt/--train-on-response")
    add_eos: bool = setting(True, "Append eos after every response, so the model learns to stop.",
                            flag="--add-eos/--no-eos")
    skip_invalid: bool = setting(False, "Leave out invalid records instead of stopping.",
                                 flag="--skip-invalid/--no-skip-invalid")
    cache_dir: str = setting(".lora-cache", "Folder of the tokenized-data cache.")



class ModelConfig(Section):
    name: str = setting(DEFAULT_MODEL, "Base model: hub id, local folder, or 'smollm2-135m' (embedded, offline).",
                        flag="--model", short="-m")
    quantization: Literal["nf4", "none"] = setting("nf4", "nf4 (4-bit QLoRA) or none.", short="-q")
    trust_remote_code: bool = setting(False, "Allow model code from the model's own repository.",
                                      flag="--trust-remote-code/--no-trust-remote-code")
    # Non-quantized weights (embeddings, lm_head, norms): fp32 as peft's
    # prepare_model_for_kbit_training does, or left in the compute dtype (faster, less memory).
    upcast: Literal["auto", "fp32", "none"] = setting(
        "auto", "Non-quantized weights (norms, embeddings): fp32 (as peft's prepare_model_for_kbit_training), "
        "none, or auto (fp32 under fp16).")
    attn_implementation: Literal["sdpa", "flex_attention", "eager"] = setting(
        "sdpa", "Attention kernel: sdpa, flex_attention or eager.", panel="speed")
    dequantize: OnOff = setting("auto", "Keep the NF4 base dequantized in the compute dtype during training: the same "
                                      "values, faster steps, more memory. auto: on a GPU when it fits the memory "
                                      "budget; on; off.", panel="speed")



class LoraSettings(Section):
    r: Positive = setting(16, "LoRA rank.", flag="--lora-r", short="-r")
    alpha: Positive = setting(32, "LoRA alpha (the update is scaled by alpha / rank).", flag="--lora-alpha")
    dropout: Share = setting(0.05, "Dropout on the LoRA input.", flag="--lora-dropout")
    target_modules: Annotated[list[str], BeforeValidator(_comma_list), Field(min_length=1)] = setting(
        ["q_proj", "v_proj"], "Comma-separated module names, or all-linear.")
    bias: Literal["none", "all", "lora_only"] = setting(
        "none", "Biases trained too: none, all or lora_only.", flag="--lora-bias")
    use_dora: bool = setting(False, "DoRA: a trained magnitude per output feature on top of the LoRA direction "
                                    "(peft's use_dora).", flag="--use-dora/--no-dora")
    use_rslora: bool = setting(False, "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank "
                                      "(peft's use_rslora).", flag="--use-rslora/--no-rslora")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "loftq"] = setting(
        "default", "LoRA initialisation: default (B = 0), gaussian, pissa or olora (unquantized base only), loftq "
                   "(4-bit base only).")


class TrainConfig(Section):
    epochs: Annotated[int, Field(gt=0, le=100_000)] = setting(
        3, "Passes over the training data.", short="-e", panel="schedule")
    batch_size: Positive = setting(2, "Examples per micro-batch (padded batching).", short="-b", panel="optimisation")
    eval_batch_size: Positive = setting(2, "Examples per evaluation micro-batch (padded batching).", panel="evaluation")
    grad_accum: Positive = setting(2, "Micro-batches per optimizer step.", panel="optimisation")
    lr: Annotated[float, Field(gt=0)] = setting(2e-4, "Peak learning rate (AdamW).", panel="optimisation")
    weight_decay: Annotated[float, Field(ge=0)] = setting(0.0, "AdamW weight decay.", panel="optimisation")
    warmup_steps: Count = setting(0, "Optimizer steps of linear warmup.", panel="schedule")
    warmup_ratio: Share = setting(0.0, "Linear warmup over this share of the optimizer steps (instead of "
                                       "--warmup-steps).", panel="schedule")
    scheduler: Literal["linear", "cosine", "constant"] = setting(
        "linear", "Learning-rate schedule after warmup: linear, cosine or constant.", panel="schedule")
    min_lr_ratio: Share = setting(0.0, "With --scheduler cosine: decay to this share of --lr instead of 0 "
                                       "(transformers' cosine_with_min_lr).", panel="schedule")
    loraplus_lr_ratio: Annotated[float, Field(ge=0)] = setting(
        0.0, "LoRA+: lora_B learns this many times faster than lora_A (peft's create_loraplus_optimizer; 16 in"
        " the paper); 0 = off.", panel="optimisation")
    neftune_alpha: Annotated[float, Field(ge=0)] = setting(
        0.0, "NEFTune: uniform noise of this scale on the input embeddings, in training steps only (5 in the "
        "paper); 0 = off.", panel="optimisation")
    early_stopping_patience: Count = setting(
        0, "Stop once the eval loss has not improved for N evaluations and keep the best adapter as the "
        "result (needs --val); 0 = off.", panel="evaluation")
    select_by: Literal["loss", "stop-rate"] = setting(
        "loss", "What early stopping and the best adapter kept go by: loss (the eval loss) or stop-rate (the "
        "--eval-generate probe's stop rate, ties broken by the eval loss).", panel="evaluation")
    eval_generate: Count = setting(8, "At each evaluation, greedy answers for the first K val prompts: stop rate and "
                                    "a sample answer; 0 = off.", panel="evaluation")
    report_to: str = setting("none", "Experiment trackers, offline, logs in OUTPUT/logs: none, or a comma list of "
                                     "tensorboard, wandb, mlflow.", panel="output")
    max_grad_norm: Annotated[float, Field(ge=0)] = setting(
        1.0, "Clip gradients to this global norm (0: no clipping).", panel="optimisation")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "auto (bf16 where the hardware has it), bf16, fp16 or fp32.", panel="speed")
    seed: Annotated[int, Field(ge=0, lt=2**63)] = setting(
        42, "Seed of the shuffling, LoRA initialisation and dropout.", panel="optimisation")
    log_every: Positive = setting(10, "Log the train loss every N optimizer steps (and after the first).", panel="output")
    max_steps: Annotated[int, Field(ge=0, le=10**9)] = setting(
        0, "Stop after this many optimizer steps (0: all epochs).", panel="schedule")
    save_every_steps: Annotated[int, Field(ge=0, le=10**9)] = setting(
        0, "Also checkpoint every N optimizer steps (0: at each epoch end only).", panel="output")
    keep_checkpoints: Positive = setting(2, "Checkpoints kept in the output folder.", panel="output")
    batching: Literal["auto", "packed", "padded"] = setting(
        "auto", "packed (token-budget rows, per-example attention), padded (the seed's), auto.", panel="speed")
    max_tokens: Count = setting(0, "Tokens per packed micro-batch (0: automatic).", panel="speed")
    pack_length: Count = setting(0, "Tokens per packed row (0: automatic, 1024 on a GPU).", panel="speed")
    gradient_checkpointing: str = setting("auto", "auto (as many layers as the memory budget needs), on, off, or a "
                                                  "number of layers.", panel="speed")
    memory_budget_gib: Annotated[float, Field(ge=0)] = setting(
        0.0, "GPU memory the automatic settings plan for (0: min(24 GiB, 90% of the GPU)).", panel="speed")
    compile: Annotated[Literal["auto", "on", "graphs", "off"], BeforeValidator(_on_off)] = setting(
        "auto", "CUDA graphs and torch.compile: auto (one CUDA GPU, 20+ steps, static shapes: the decoder's forward "
        "and backward captured as CUDA graphs, its layers compiled inside for 1000+ steps; else compiled layers "
        "for 200+ steps; the run says why), graphs (captured and compiled), on (compiled layers only), off.",
        panel="speed")
    fused_loss: bool = setting(True, "Compute the loss from hidden states chunk by chunk, never the full "
                                     "[tokens x vocab] logits.", flag="--fused-loss/--no-fused-loss", panel="speed")
    eval_at_start: bool = setting(True, "Evaluate once before the first step (a baseline).",
                                  flag="--eval-at-start/--no-eval-at-start", panel="evaluation")
    device: str = setting("auto", "auto, cpu or cuda.", panel="speed")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _layers_or_mode(cls, value: Any) -> Any:
        value = _on_off(value)
        if isinstance(value, int) and value >= 0 or isinstance(value, str) and (value.isdigit() or value in
                                                                                 ("auto", "on", "off")):
            return str(value)
        raise ValueError("choose auto, on, off, or a number of layers")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        check_device_name(value)
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, value: str) -> str:
        names = [n.strip().lower() for n in value.split(",") if n.strip()]
        for name in names:
            if name not in ("none", *TRACKERS):
                raise ValueError(f"choose none or a comma list of {', '.join(TRACKERS)}, not {name!r}")
        return ",".join(dict.fromkeys(n for n in names if n != "none")) or "none"

    @model_validator(mode="after")
    def _schedule(self) -> "TrainConfig":
        if self.warmup_ratio and self.warmup_steps:
            raise _bad("train", "warmup_ratio", self.warmup_ratio, "give --warmup-steps or --warmup-ratio, not both")
        if self.min_lr_ratio and self.scheduler != "cosine":
            raise _bad("train", "min_lr_ratio", self.min_lr_ratio, "a floor applies to --scheduler cosine only")
        return self

    def trackers(self) -> list[str]:
        """The experiment trackers asked for, in order, without duplicates ([] for none)."""
        return [] if self.report_to == "none" else self.report_to.split(",")  # as _trackers wrote it


class OutputConfig(Section):
    dir: str = setting("adapters", "Adapter folder to write.", flag="--output", short="-o")


class RunConfig(BaseModel):
    """The whole run: five sections, each validated by pydantic (types, ranges, choices), then the checks
    across sections. Build one from YAML-like data with `from_dict`, which turns pydantic's errors into
    one LoraCliError naming the setting."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # --help reads the fields, never validates

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "RunConfig":
        """Checks across sections: a LoRA initialisation that needs a (non-)quantized base, early stopping."""
        init, quant = self.lora.init_lora_weights, self.model.quantization
        if init in ("pissa", "olora") and quant == "nf4":
            raise LoraCliError(f"--init-lora-weights {init} rewrites the base weights it starts from; on a 4-bit base "
                               "they would be quantized again, and the adapter would no longer fit the base that "
                               "generate and merge load.",
                               "Pass --quantization none with it, or use default, gaussian or loftq on a 4-bit base.")
        if init in ("pissa", "olora") and self.lora.use_dora:
            raise LoraCliError(f"--init-lora-weights {init} and --use-dora do not go together: peft turns a {init} "
                               "adapter into a plain LoRA of the original base when it is saved, and DoRA's "
                               "magnitudes have no such form.", "Choose one of them.")
        if init == "loftq" and quant != "nf4":
            raise LoraCliError("--init-lora-weights loftq offsets the error of the 4-bit quantization, and "
                               "--quantization none has none.", "Use it with --quantization nf4 (the default).")
        if init == "loftq" and self.model.dequantize == "on":
            raise LoraCliError("--init-lora-weights loftq computes its start from the 4-bit weights, and --dequantize "
                               "on replaces them before LoRA is attached.", "Leave --dequantize at auto (or off).")
        if self.train.early_stopping_patience and not self.data.val:
            raise LoraCliError("--early-stopping-patience watches the eval loss, and there is no --val data.",
                               "Pass --val FILE.jsonl, or leave --early-stopping-patience at 0.")
        if self.train.select_by == "stop-rate" and not self.train.eval_generate:
            raise LoraCliError("--select-by stop-rate needs the stop-rate probe, and --eval-generate is 0.",
                               "Pass --eval-generate 8 (the default), or --select-by loss.")
        return self

    # ---- conversion -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        """Validate `raw` ({section: {key: value}}, as YAML reads it); LoraCliError naming the first bad key."""
        if not isinstance(raw, dict):
            raise LoraCliError(f"{source}: expected a mapping of sections ({', '.join(cls.model_fields)}).")
        try:  # an empty section (`train:` alone) reads as None
            return cls.model_validate({k: {} if v is None else v for k, v in raw.items()})
        except ValidationError as exc:
            raise _config_error(exc.errors()[0], source) from None

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied (`{"train.lr": 1e-4}`), validated again."""
        raw = self.model_dump()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in raw or key not in raw[section]:
                import difflib

                known = [f"{s}.{k}" for s, keys in raw.items() if isinstance(keys, dict) for k in keys]
                close = [k for k in known if k.startswith(dotted)][:3] or difflib.get_close_matches(dotted, known, n=2)
                hint = f" Did you mean {', '.join(close)}?" if close else " Settings look like train.lr or lora.r."
                raise LoraCliError(f"Unknown setting '{dotted}'.{hint}")
            raw[section][key] = value
        return RunConfig.from_dict(raw)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# What a pydantic error type means for a setting, in the words of lora-cli's other messages.
_WHY = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
    "less_than_equal": "must be at most {le:,}", "literal_error": "choose {expected}",
    "int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_parsing": "must be true or false (on or off)", "bool_type": "must be true or false (on or off)",
    "string_type": "must be text", "list_type": "must be a list of names (or one comma-separated string)",
    "too_short": "must not be empty",
}


def _config_error(error: dict[str, Any], source: str) -> LoraCliError:
    """One pydantic error as the message a user reads: the setting, the value given, what it must be."""
    loc, kind = [str(part) for part in error["loc"]], error["type"]
    where = "" if source == "config" else f"{source}: "
    sections = list(RunConfig.model_fields)
    if kind == "extra_forbidden" and len(loc) == 1:
        return LoraCliError(f"{source}: unknown section(s) {loc[0]}; known: {', '.join(sections)}.")
    if kind == "extra_forbidden":
        known = sorted(RunConfig.model_fields[loc[0]].annotation.model_fields)
        return LoraCliError(f"{source}: {loc[0]}: unknown key(s) {loc[1]}; known: {', '.join(known)}.")
    if len(loc) == 1:
        return LoraCliError(f"{source}: section '{loc[0]}' must be a mapping.")
    context = error.get("ctx") or {}
    if kind == "value_error":
        why = str(context.get("error", error["msg"]))
    else:
        why = _WHY[kind].format(**context) if kind in _WHY else error["msg"]
    flag = _as_flag(str(loc[0]), str(loc[1])) if len(loc) >= 2 else ""
    return LoraCliError(f"{where}Invalid config value {'.'.join(map(str, loc[:2]))}={error['input']!r}{flag}: {why}.")
