"""Model resolution plus tokenized splits: what both `tokenize` and `train` start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.config import RunConfig
from lora_cli.data import current as current_dataset
from lora_cli.data.cache import CacheEntry, build_or_load
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy
from lora_cli.errors import LoraCliError
from lora_cli.model.load import load_tokenizer
from lora_cli.model.resolve import ResolvedModel, resolve_model
from lora_cli.progress import NULL_REPORTER

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

    from lora_cli.data.templates import ChatTemplate, TextTemplate
    from lora_cli.progress import Reporter


@dataclass
class PreparedData:
    model: ResolvedModel
    tokenizer: PreTrainedTokenizerBase
    template: TextTemplate | ChatTemplate
    train: CacheEntry
    val: CacheEntry | None
    current: current_dataset.CurrentDataset | None = None  # as recorded by this call, if it recorded one


def prepare_data(cfg: RunConfig, reporter: Reporter = NULL_REPORTER, force: bool = False, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, record: bool = False,
                 current: current_dataset.CurrentDataset | None = None) -> PreparedData:
    """Tokenize (or reuse) the splits. With several processes, only the main one tokenizes.

    What the data's entries have to say (left-out examples, warnings) goes to `reporter`, on a
    cache hit as when the entry is built. `record`: make the result the working directory's current
    dataset (tokenize does). `current`: the current dataset this run's data came from (train without
    --train): a file that changed since it was tokenized is named when it is tokenized again, and the
    record follows the new content when the run's settings are the recorded ones."""
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
    policy = LabelPolicy(cfg.data.max_length, cfg.data.train_on_prompt, cfg.data.add_eos)
    entries = {}
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        if path:
            why = current.change_note(split, path) if current is not None and is_main else None
            entries[split] = build_or_load(split, path, tokenizer, resolved.path, template, policy,
                                           cfg.data.cache_dir, cfg.data.skip_invalid, force and is_main, reporter, why)
            for note in entries[split].notes():
                reporter.message(note)
    if is_main and "val" in entries:
        _say_val_overlap(entries["train"], entries["val"], reporter)
    recorded = (current_dataset.record(cfg, entries, tokenizer.eos_token)
                if is_main and (record or _moved_on(current, cfg, entries)) else None)
    if is_main:
        barrier()
    return PreparedData(resolved, tokenizer, template, entries["train"], entries.get("val"), recorded)


def _moved_on(current: current_dataset.CurrentDataset | None, cfg: RunConfig, entries: dict) -> bool:
    """The current dataset's files changed and this run tokenized them with its settings: record the new content."""
    if current is None or not current.same_settings(cfg):
        return False
    return {s: e.key for s, e in entries.items()} != {s: f.cache_key for s, f in current.files.items()}


def _say_val_overlap(train: CacheEntry, val: CacheEntry, reporter: Reporter) -> None:
    """A warning when validation records are also training records (from the entries' digests)."""
    from lora_cli.data.overlap import RecordDigests, shared, val_overlap_note

    train_digests, val_digests = RecordDigests.load(train.path), RecordDigests.load(val.path)
    if train_digests is None or val_digests is None:
        return
    pairs = shared(val_digests, train_digests)
    if pairs:
        reporter.message("warning " + val_overlap_note(pairs, len(val_digests), val.meta.source,
                                                      train.meta.source))
