"""One dataclass tree describing a run; its defaults are the reference ("seed") recipe.

Every command reads the part it needs. A run can come from a YAML file (`--config`), from
flags, or from `--set section.key=value` overrides, in that order of precedence (flags win);
under all of them, `train` without --train puts the current dataset's settings (build_config).
The config a run actually used is saved beside its outputs, so it can be reproduced and so
`generate`/`eval` can render prompts exactly as training did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_type_hints

from lora_cli.errors import LoraCliError

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("nf4", "none")
BATCHINGS = ("auto", "packed", "padded")
GC_MODES = ("auto", "on", "off")
SCHEDULERS = ("linear", "cosine", "constant")
UPCASTS = ("auto", "fp32", "none")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
TRACKERS = ("tensorboard", "wandb", "mlflow")


_ONOFF = {True: "on", False: "off", "True": "on", "False": "off", "true": "on", "false": "off"}


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N (whether that device exists is device.pick_device's question)."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise LoraCliError(f"--device must be auto, cpu or cuda (or cuda:N), not {device!r}.")


def _bad(section: str, key: str, value: Any, why: str) -> LoraCliError:
    return LoraCliError(f"Invalid config value {section}.{key}={value!r}: {why}.")


def _check_choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(section, key, value, f"choose one of {', '.join(choices)}")


def _check_positive(section: str, key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise _bad(section, key, value, "must be a number " + (">= 0" if allow_zero else "> 0"))


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
            factory: Any = None, set_only: bool = False):
    """A config field with what its command-line flag needs: help text, and a flag name where the
    field's own name (`max_length` -> `--max-length`) would be unclear. A bool flag is written as
    `--on/--off`. `set_only`: no flag of its own, reachable only through --set section.key=value."""
    meta = {"help": help, "flag": flag, "short": short, "set_only": set_only}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train: str | None = setting(None, "Training data (JSONL, or a JSON array of records).")
    val: str | None = setting(None, "Validation data (same format); evaluated before training and after each epoch.")
    template: str = setting("alpaca", "Prompt template: alpaca, alpaca-seed, chat, or a template file.", short="-t")
    max_length: int = setting(512, "Truncate examples to this many tokens.")
    train_on_prompt: bool = setting(False, "Put labels on the prompt too (the seed recipe's behaviour), or on the "
                                           "response only.", flag="--train-on-prompt/--train-on-response")
    add_eos: bool = setting(True, "Append eos after every response, so the model learns to stop.",
                            flag="--add-eos/--no-eos")
    skip_invalid: bool = setting(False, "Leave out invalid records instead of stopping.",
                                 flag="--skip-invalid/--no-skip-invalid")
    cache_dir: str = setting(".lora-cache", "Folder of the tokenized-data cache.")

    def __post_init__(self) -> None:
        _check_positive("data", "max_length", self.max_length)
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise _bad("data", "max_length", self.max_length, "must be an integer of at least 8")
        if not isinstance(self.template, str) or not self.template:
            raise _bad("data", "template", self.template, "name a template or a template file")


@dataclass
class ModelConfig:
    name: str = setting(DEFAULT_MODEL, "Base model: hub id, local folder, or 'smollm2-135m' (embedded, offline).",
                        flag="--model", short="-m")
    quantization: str = setting("nf4", "nf4 (4-bit QLoRA) or none.", short="-q")
    trust_remote_code: bool = setting(False, "Allow model code from the model's own repository.",
                                      flag="--trust-remote-code/--no-trust-remote-code")
    # Non-quantized weights (embeddings, lm_head, norms): fp32 as peft's
    # prepare_model_for_kbit_training does, or left in the compute dtype (faster, less memory).
    upcast: str = setting("auto", "Non-quantized weights (norms, embeddings): fp32 (as peft's "
                                  "prepare_model_for_kbit_training), none, or auto (fp32 under fp16).")
    attn_implementation: str = setting("sdpa", "Attention kernel: sdpa, flex_attention or eager.")
    dequantize: str = setting("auto", "Keep the NF4 base dequantized in the compute dtype during training: the same "
                                      "values, faster steps, more memory. auto: on a GPU when it fits the memory "
                                      "budget; on; off.")

    def __post_init__(self) -> None:
        _check_choice("model", "quantization", self.quantization, QUANTIZATIONS)
        _check_choice("model", "upcast", self.upcast, UPCASTS)
        _check_choice("model", "attn_implementation", self.attn_implementation, ("sdpa", "flex_attention", "eager"))
        self.dequantize = _ONOFF.get(self.dequantize, self.dequantize)
        _check_choice("model", "dequantize", self.dequantize, ("auto", "on", "off"))


@dataclass
class LoraSettings:
    r: int = setting(16, "LoRA rank.", flag="--lora-r", short="-r")
    alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / rank).", flag="--lora-alpha")
    dropout: float = setting(0.05, "Dropout on the LoRA input.", flag="--lora-dropout")
    target_modules: list[str] = setting(help="Comma-separated module names, or all-linear.",
                                        factory=lambda: ["q_proj", "v_proj"])
    bias: str = setting("none", "Biases trained too: none, all or lora_only.", flag="--lora-bias")
    use_dora: bool = setting(False, "DoRA: a trained magnitude per output feature on top of the LoRA direction "
                                    "(peft's use_dora).", flag="--use-dora/--no-dora")
    use_rslora: bool = setting(False, "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank "
                                      "(peft's use_rslora).", flag="--use-rslora/--no-rslora")
    init_lora_weights: str = setting("default", "LoRA initialisation: default (B = 0), gaussian, pissa or olora "
                                                "(unquantized base only), loftq (4-bit base only).")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if not self.target_modules:
            raise _bad("lora", "target_modules", self.target_modules, "name at least one module")
        _check_positive("lora", "r", self.r)
        _check_positive("lora", "alpha", self.alpha)
        if not (0 <= self.dropout < 1):
            raise _bad("lora", "dropout", self.dropout, "must be in [0, 1)")
        _check_choice("lora", "bias", self.bias, ("none", "all", "lora_only"))
        _check_choice("lora", "init_lora_weights", self.init_lora_weights, LORA_INITS)


@dataclass
class TrainConfig:
    epochs: int = setting(3, "Passes over the training data.", short="-e")
    batch_size: int = setting(2, "Examples per micro-batch (padded batching).", short="-b")
    eval_batch_size: int = setting(2, "Examples per evaluation micro-batch (padded batching).")
    grad_accum: int = setting(2, "Micro-batches per optimizer step.")
    lr: float = setting(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_steps: int = setting(0, "Optimizer steps of linear warmup.")
    warmup_ratio: float = setting(0.0, "Linear warmup over this share of the optimizer steps (instead of "
                                       "--warmup-steps).")
    scheduler: str = setting("linear", "Learning-rate schedule after warmup: linear, cosine or constant.")
    min_lr_ratio: float = setting(0.0, "With --scheduler cosine: decay to this share of --lr instead of 0 "
                                       "(transformers' cosine_with_min_lr).")
    loraplus_lr_ratio: float = setting(0.0, "LoRA+: lora_B learns this many times faster than lora_A (peft's "
                                            "create_loraplus_optimizer; 16 in the paper); 0 = off.")
    neftune_alpha: float = setting(0.0, "NEFTune: uniform noise of this scale on the input embeddings, in training "
                                        "steps only (5 in the paper); 0 = off.")
    early_stopping_patience: int = setting(0, "Stop once the eval loss has not improved for N evaluations and keep "
                                              "the best adapter as the result (needs --val); 0 = off.")
    eval_generate: int = setting(8, "At each evaluation, greedy answers for the first K val prompts: stop rate and "
                                    "a sample answer; 0 = off.")
    report_to: str = setting("none", "Experiment trackers, offline, logs in OUTPUT/logs: none, or a comma list of "
                                     "tensorboard, wandb, mlflow.")
    max_grad_norm: float = setting(1.0, "Clip gradients to this global norm (0: no clipping).")
    precision: str = setting("auto", "auto (bf16 where the hardware has it), bf16, fp16 or fp32.")
    seed: int = setting(42, "Seed of the shuffling, LoRA initialisation and dropout.")
    log_every: int = setting(10, "Log the train loss every N optimizer steps.")
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: all epochs).")
    save_every_steps: int = setting(0, "Also checkpoint every N optimizer steps (0: at each epoch end only).")
    keep_checkpoints: int = setting(2, "Checkpoints kept in the output folder.")
    batching: str = setting("auto", "packed (token-budget rows, per-example attention), padded (the seed's), auto.")
    max_tokens: int = setting(0, "Tokens per packed micro-batch (0: automatic).")
    pack_length: int = setting(0, "Tokens per packed row (0: automatic, 1024 on a GPU).")
    gradient_checkpointing: str = setting("auto", "auto (as many layers as the memory budget needs), on, off, or a "
                                                  "number of layers.")
    memory_budget_gib: float = setting(0.0, "GPU memory the automatic settings plan for (0: min(24 GiB, 90% of "
                                            "the GPU)).")
    compile: str = setting("auto", "torch.compile each decoder layer: auto (on one CUDA GPU, for runs long enough to "
                                   "repay it: graphs where the step's shapes are static, else on; the run says why), on, "
                                   "graphs (compiled and replayed as CUDA graphs: static shapes), off.")
    fused_loss: bool = setting(True, "Compute the loss from hidden states chunk by chunk, never the full "
                                     "[tokens x vocab] logits.", flag="--fused-loss/--no-fused-loss")
    eval_at_start: bool = setting(True, "Evaluate once before the first step (a baseline).",
                                  flag="--eval-at-start/--no-eval-at-start")
    device: str = setting("auto", "auto, cpu or cuda.")

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "log_every"):
            _check_positive("train", key, getattr(self, key))
        for key in ("lr",):
            _check_positive("train", key, getattr(self, key))
        for key in ("weight_decay", "warmup_steps", "max_steps", "save_every_steps", "max_tokens", "max_grad_norm",
                    "loraplus_lr_ratio", "neftune_alpha", "early_stopping_patience", "eval_generate"):
            _check_positive("train", key, getattr(self, key), allow_zero=True)
        _check_positive("train", "keep_checkpoints", self.keep_checkpoints)
        if not (0 <= self.seed < 2**63):
            raise _bad("train", "seed", self.seed, "must be an integer in [0, 2^63)")
        for key, limit in (("epochs", 100_000), ("max_steps", 10**9), ("save_every_steps", 10**9)):
            if getattr(self, key) > limit:
                raise _bad("train", key, getattr(self, key), f"must be at most {limit:,}")
        _check_choice("train", "precision", self.precision, PRECISIONS)
        _check_choice("train", "batching", self.batching, BATCHINGS)
        self.compile = _ONOFF.get(self.compile, self.compile)  # YAML reads a bare on/off as a boolean
        _check_choice("train", "compile", self.compile, ("auto", "on", "graphs", "off"))
        gc = self.gradient_checkpointing
        self.gradient_checkpointing = {True: "on", False: "off", "True": "on", "False": "off"}.get(gc, gc)
        if not (str(self.gradient_checkpointing).isdigit() or self.gradient_checkpointing in GC_MODES):
            raise _bad("train", "gradient_checkpointing", self.gradient_checkpointing,
                       "choose auto, on, off, or a number of layers")
        self.gradient_checkpointing = str(self.gradient_checkpointing)
        _check_positive("train", "pack_length", self.pack_length, allow_zero=True)
        _check_positive("train", "memory_budget_gib", self.memory_budget_gib, allow_zero=True)
        _check_choice("train", "scheduler", self.scheduler, SCHEDULERS)
        check_device_name(self.device)
        self._check_schedule_and_trackers()

    def _check_schedule_and_trackers(self) -> None:
        for key in ("warmup_ratio", "min_lr_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise _bad("train", key, value, "must be a share in [0, 1)")
        if self.warmup_ratio and self.warmup_steps:
            raise _bad("train", "warmup_ratio", self.warmup_ratio, "give --warmup-steps or --warmup-ratio, not both")
        if self.min_lr_ratio and self.scheduler != "cosine":
            raise _bad("train", "min_lr_ratio", self.min_lr_ratio, "a floor applies to --scheduler cosine only")
        names = self.trackers()
        for name in names:
            _check_choice("train", "report_to", name, ("none", *TRACKERS))
        self.report_to = ",".join(names) or "none"

    def trackers(self) -> list[str]:
        """The experiment trackers asked for, in order, without duplicates ([] for none)."""
        names = [n.strip().lower() for n in str(self.report_to).split(",") if n.strip()]
        return list(dict.fromkeys(n for n in names if n != "none"))


@dataclass
class OutputConfig:
    dir: str = setting("adapters", "Adapter folder to write.", flag="--output", short="-o")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
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

    # ---- conversion -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise LoraCliError(f"{source}: expected a mapping of sections (data, model, lora, train, output).")
        sections = {f.name: f for f in fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise LoraCliError(
                f"{source}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sections)}."
            )
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise LoraCliError(f"{source}: section '{name}' must be a mapping.")
            built[name] = _build_section(section_cls, values, f"{source}: {name}")
        return cls(**built)

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied (`{"train.lr": 1e-4}`), validated again."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in raw or key not in raw[section]:
                raise LoraCliError(f"Unknown setting '{dotted}'. Settings look like train.lr or lora.r.")
            raw[section][key] = value
        return RunConfig.from_dict(raw)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn YAML or `--set` strings into the field's type, with a clear error when impossible."""
    text = str(annotation)
    if value is None:
        return None
    try:
        if annotation is bool or text == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int or text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float or text == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "list" in text:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
        if "str" in text:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise LoraCliError(f"{where}: cannot use {value!r} here (expected {text.replace('typing.', '')}).") from None
    return value


def _build_section(section_cls, values: dict[str, Any], where: str):
    hints = get_type_hints(section_cls)
    names = {f.name for f in fields(section_cls)}
    unknown = set(values) - names
    if unknown:
        raise LoraCliError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}.")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return section_cls(**kwargs)
