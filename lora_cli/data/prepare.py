"""Model resolution plus tokenized splits: what both `tokenize` and `train` start from."""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.config import RunConfig
from lora_cli.data.cache import CacheEntry, build_or_load
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy
from lora_cli.errors import LoraCliError
from lora_cli.model.load import load_tokenizer
from lora_cli.model.resolve import ResolvedModel, resolve_model
from lora_cli.progress import NULL_REPORTER


@dataclass
class PreparedData:
    model: ResolvedModel
    tokenizer: object
    template: object
    train: CacheEntry
    val: CacheEntry | None


def label_policy(cfg: RunConfig) -> LabelPolicy:
    d = cfg.data
    return LabelPolicy(max_length=d.max_length, train_on_prompt=d.train_on_prompt, add_eos=d.add_eos)


def prepare_data(cfg: RunConfig, reporter=NULL_REPORTER, force: bool = False, is_main: bool = True,
                 barrier=lambda: None) -> PreparedData:
    """Tokenize (or reuse) the splits. With several processes, only the main one tokenizes.

    What the data's entries have to say (left-out examples, warnings) goes to `reporter`, on a
    cache hit as when the entry is built."""
    if not cfg.data.train:
        raise LoraCliError("No training data given.", "Pass --train FILE.jsonl (or data.train in --config).")
    if not is_main:
        try:
            barrier()  # wait until the main process has built the cache; then every entry is a hit
        except Exception:  # the main process stopped (bad data, say) and closed the connection
            raise LoraCliError("Stopped: the main process ended while preparing the data (its message says why).") from None
    resolved = resolve_model(cfg.model.name, reporter)
    tokenizer = load_tokenizer(resolved.path, cfg.model.trust_remote_code)
    template = get_template(cfg.data.template)
    policy = label_policy(cfg)
    entries = {}
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        if path:
            entries[split] = build_or_load(split, path, tokenizer, resolved.path, template, policy,
                                           cfg.data.cache_dir, cfg.data.skip_invalid, force and is_main, reporter)
            for note in entries[split].notes():
                reporter.message(note)
    if is_main:
        barrier()
    return PreparedData(resolved, tokenizer, template, entries["train"], entries.get("val"))
