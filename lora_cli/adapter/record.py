"""What run_config.yaml holds, as typed records: the settings a run used and its `run:` section.

`lora-cli train` writes run_config.yaml (the run config's sections, then `run:`); resume, the
output-folder refusals and every command that reads an adapter read it back through `SavedRun`,
once (adapter/folder.py reads the file). Files written by an older lora-cli are brought to
today's layout here and nowhere else, each record's `from_dict` for its part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from lora_cli.config import DataConfig, LoraSettings, ModelConfig, TrainConfig

@dataclass(frozen=True)
class RunDecisions:
    """What a run decided for itself (train's plan.record, the warm-up and the probe's cap), as
    run_config.yaml records it under `run:` beside the record's own fields."""

    device: str  # cpu, cuda:0, ...
    precision: str  # bf16 | fp16 | fp32
    batching: str  # packed | padded
    max_tokens: int  # tokens per training micro-batch
    pack_length: int  # tokens per packed row (0: one row of max_tokens)
    checkpoint_layers: int  # gradient checkpointing: 0 none, -1 all, N the first N decoder layers
    upcast: str  # fp32 | none
    compile: str  # off | on | graphs
    static_shapes: bool
    dequantized_base: bool
    world_size: int  # processes
    fsdp: bool
    micro_batches_per_step: int
    fused_loss: bool
    compile_scope: str  # layers | backbone: what one CUDA graph covers (a decoder layer, or the whole decoder)
    compile_layers: bool  # decoder layers torch.compiled
    warmup_steps: int  # optimizer steps of learning-rate warm-up
    eval_generate_max_new_tokens: int  # the stop-rate probe's longest answer cap (0: no probe)


@dataclass
class BestEvaluation:
    """Early stopping's result: the evaluation whose adapter is written, and whether the run stopped early."""

    step: int
    eval_loss: float
    checkpoint: str  # the checkpoint folder's name under checkpoints/
    stopped_early: bool
    last_step: int  # the optimizer step the run ended at


@dataclass
class LoopSummary:
    """What a run did (train's loop), as run_config.yaml records it under run.summary. Losses are mean
    response losses (nats per target token); `stop_rates`: [stopped, prompts] of each evaluation's probe."""

    first_loss: float | None
    last_loss: float | None
    eval_losses: list[float]
    stop_rates: list[list[int]]
    steps: int
    tokens: int
    seconds: float
    tokenize_cache: dict[str, str | None] = field(default_factory=dict)  # split -> tokenize cache key
    best: BestEvaluation | None = None
    probe_seconds: float = 0.0  # spent in the stop-rate probe (--eval-generate), its warm-up included

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        if self.best is None:
            del raw["best"]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopSummary:
        """As any lora-cli wrote it; TypeError when it is not a summary. Older summaries: before the
        stop-rate probe there are no stop_rates (those runs measured none), and for a while its time
        was `probe_s`; fields added since (tokenize_cache, best, probe_seconds) take their defaults."""
        today = {"stop_rates": []} | {("probe_seconds" if k == "probe_s" else k): v for k, v in raw.items()}
        if "best" in today:
            today["best"] = BestEvaluation(**today["best"])
        return cls(**today)


@dataclass
class RunRecord:
    """The `run:` section of run_config.yaml: what `lora-cli train` recorded about its run."""

    fingerprint: str = ""  # run_fingerprint: the settings and the content trained on
    lora_cli_version: str = ""
    finished: bool = False  # true once every final file is in place
    tokenize_cache: dict[str, str] = field(default_factory=dict)  # split -> tokenize cache key
    data_sha256: dict[str, str] = field(default_factory=dict)  # split -> sha256 of the data file
    base_model: dict[str, Any] = field(default_factory=dict)  # model/identity.py's identity of the base
    decisions: RunDecisions | None = None  # None: decisions of an older lora-cli (see from_dict)
    summary: LoopSummary | None = None  # what the loop did, once finished

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        """The section as any lora-cli wrote it. TypeError when it is not a mapping.

        Older lora-cli versions wrote fewer fields (no tokenize_cache, data_sha256 or base_model before
        the fingerprint held the content and the base): they take the defaults above, as does the
        summary of a run not finished. Their decisions are other than today's (fewer, or named otherwise): such a
        record keeps no decisions, which nothing reads back but the user, and stays readable for what
        resume and the refusals need (fingerprint, finished, content, summary)."""
        if not isinstance(raw, dict):
            raise TypeError(f"the run section is a {type(raw).__name__}, not a mapping")
        named = {f.name for f in fields(cls)} - {"decisions"}
        present = {k: v for k, v in raw.items() if k in named and v is not None}
        if "summary" in present:
            present["summary"] = LoopSummary.from_dict(present["summary"])
        loose = {k: v for k, v in raw.items() if k not in named}
        same_decisions = set(loose) == {f.name for f in fields(RunDecisions)}
        return cls(**present, decisions=RunDecisions(**loose) if same_decisions else None)

    def to_dict(self) -> dict[str, Any]:
        """As run_config.yaml holds it: the named fields, the decisions, then the summary if any."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("decisions", "summary")}
        decisions = asdict(self.decisions) if self.decisions is not None else {}
        return raw | decisions | ({"summary": self.summary.to_dict()} if self.summary is not None else {})


@dataclass(frozen=True)
class SavedRun:
    """run_config.yaml read back: the settings the run used, section by section, and its run record."""

    data: DataConfig
    model: ModelConfig
    lora: LoraSettings
    train: TrainConfig
    run: RunRecord

    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "model", "lora", "train")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SavedRun:
        """The file as YAML reads it. TypeError when a section is not a mapping.

        The sections are taken as written, not validated again: lora-cli validated them before
        writing, and a rule added since must not make an old adapter unreadable. A setting an older
        lora-cli did not have takes today's default (what runs without it did); one it had that
        today's does not is dropped (it no longer decides anything)."""
        if not isinstance(raw, dict):
            raise TypeError(f"the file holds a {type(raw).__name__}, not a mapping of sections")
        sections = {}
        for name, model in (("data", DataConfig), ("model", ModelConfig), ("lora", LoraSettings),
                            ("train", TrainConfig)):
            section = raw[name] if name in raw else None
            if not isinstance(section, dict):
                raise TypeError(f"the {name} section is missing or not a mapping")
            sections[name] = model.model_construct(**{k: v for k, v in section.items() if k in model.model_fields})
        return cls(**sections, run=RunRecord.from_dict(raw["run"] if "run" in raw else {}))

    def settings(self) -> dict[str, dict[str, Any]]:
        """The data, model, lora and train sections as plain values (RunConfig.model_dump's layout)."""
        return {name: getattr(self, name).model_dump() for name in self.SECTIONS}
