"""Experiment trackers (--report-to: tensorboard, wandb, mlflow) through accelerate's tracker API, each
working offline under OUTPUT/logs/ (docs/TRAINING.md says where each writes and how to read it back).

Each is an optional extra; a missing one is a message before any model loads. They get what
metrics.jsonl gets (`KEYS`), at the row's optimizer step, and the run's settings as hyperparameters.
On a resumed run TensorBoard drops the events past the checkpoint (purge_step); W&B and MLflow start
a new run.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.adapter.folder import LOGS
from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lora_cli.adapter.record import RunDecisions

PROJECT = "lora-cli"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
# the metrics.jsonl keys each tracker gets, by row type, under its own names
KEYS = {"train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                  "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch"},
        "eval": {"eval_loss": "eval/loss", "stop_rate": "eval/stop_rate", "generate_s": "eval/generate_s",
                 "sample": "eval/sample"}}


def check_installed(names: list[str]) -> None:
    """LoraCliError naming the pip command for the first tracker whose package is missing."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for name in names:
        if not available[name]():
            raise LoraCliError(f"--report-to {name} needs the {PACKAGES[name]} package, which is not installed.",
                               f"pip install 'lora-cli[{name}]' (or pip install {PACKAGES[name]}), or leave "
                               f"{name} out of --report-to.")


def logs_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output.dir) / LOGS


def accelerator_kwargs(cfg: RunConfig) -> dict:
    """What Accelerator(...) needs for the run's trackers: log_with and the TensorBoard folder."""
    names = cfg.train.trackers()
    return {"log_with": names, "project_dir": str(logs_dir(cfg) / "tensorboard")} if names else {}


def _hyperparameters(cfg: RunConfig, decisions: RunDecisions) -> dict:
    """The run's settings as flat scalars (trackers take no lists or None)."""
    flat = {f"{section}.{key}": value for section, values in cfg.model_dump().items() for key, value in values.items()}
    flat |= {f"run.{key}": value for key, value in asdict(decisions).items()}
    return {k: ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v) for k, v in flat.items()}


def start(accelerator: Accelerator, cfg: RunConfig, decisions: RunDecisions, resumed_step: int | None) -> bool:
    """init_trackers for the main process; False when no tracker was asked for."""
    names = cfg.train.trackers()
    if not names:
        return False
    logs = logs_dir(cfg)
    kwargs: dict = {"mlflow": {"run_name": Path(cfg.output.dir).name, "logging_dir": str(logs / "mlruns-artifacts")},
                    "wandb": {"mode": "offline", "dir": str(logs), "name": Path(cfg.output.dir).name}}
    if resumed_step is not None:
        kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
        if "mlflow" in names:
            import mlflow

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for this to use a plain folder
            mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (logs / "mlruns").resolve().as_uri())
        if "wandb" in names:
            os.environ.setdefault("WANDB_SILENT", "true")
    accelerator.init_trackers(PROJECT, config=_hyperparameters(cfg, decisions), init_kwargs=kwargs)
    return True
