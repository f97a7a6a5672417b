"""Find the base model: what the user typed (a hub id, a local folder, or an embedded short name)
turned into a local folder, or a clear error naming the alternatives.

Weights are taken from safetensors only; hub downloads fetch only the files lora-cli reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import LoraCliError
from lora_cli.model.embedded import EMBEDDED, ensure_converted

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


@dataclass
class ResolvedModel:
    name: str  # as the user gave it
    path: Path  # local folder with config.json
    source: str  # embedded | local | hub


def resolve_model(name: str, reporter=None, need_weights: bool = True, local_only: bool = False) -> ResolvedModel:
    """The local folder of model `name` (hub id, folder or embedded name); LoraCliError when there is none.
    `local_only`: a hub model only from the local Hub cache, never downloaded."""
    if name in EMBEDDED:
        return ResolvedModel(name, ensure_converted(name, reporter), "embedded")
    path = Path(name).expanduser()
    if path.is_file() and path.name == "config.json":
        return ResolvedModel(name, path.parent, "local")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraCliError(f"Model folder {path} has no config.json; it does not look like a transformers model.")
        if need_weights and not any(path.glob("*.safetensors")):
            raise LoraCliError(
                f"Model folder {path} has no .safetensors weights.",
                "lora-cli loads weights from safetensors only (pickled .bin files can run code); convert them first.",
            )
        return ResolvedModel(name, path, "local")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a hub id is "name" or "org/name"
        raise LoraCliError(f"Model folder {name} does not exist.")
    return ResolvedModel(name, _from_hub(name, need_weights, local_only), "hub")


def _from_hub(repo_id: str, need_weights: bool, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    patterns = HUB_PATTERNS if need_weights else ["config.json"]
    alternatives = ("Pass --model with a local folder that holds the model (config.json, *.safetensors, "
                    "tokenizer files), or --model smollm2-135m for the embedded model that works offline.")
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise LoraCliError(f"Model '{repo_id}' was not found on the Hugging Face Hub (or needs a login).",
                               alternatives) from None
        raise LoraCliError(f"Could not download model '{repo_id}' from the Hugging Face Hub: {exc}.", alternatives) from None
    except Exception as exc:  # offline, DNS failure, not in cache, bad repo id: all end the same way for a user
        raise LoraCliError(
            f"Model '{repo_id}' is not a local folder and could not be fetched from the Hugging Face Hub "
            f"(no network and no copy in the local Hub cache: {type(exc).__name__}).",
            alternatives,
        ) from None
    folder = Path(folder)
    if need_weights and not any(folder.glob("*.safetensors")):
        raise LoraCliError(f"Model '{repo_id}' has no safetensors weights on the Hub; lora-cli loads safetensors only.")
    return folder
