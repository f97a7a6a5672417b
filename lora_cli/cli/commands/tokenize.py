"""`lora-cli tokenize`: the tokenized dataset, cached on disk, reused while nothing changed."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from typing import Annotated

import typer

from lora_cli.cli.options import ConfigOpt, SetOpt, config_flags


@config_flags("data.*", "model.name", "model.trust_remote_code")
def tokenize(
    settings: dict,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cache entries even if they exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cache entries as JSON.")] = False,
    show: Annotated[int, typer.Option("--show", help="Print the first N training examples as the model sees them: "
                                                     "trained tokens highlighted, eos marked, the prompt dim.")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Tokenize the data (template, response-only labels, eos, truncation) into the on-disk cache.

    What it tokenized becomes the current dataset (.lora-cache/current.json): train, validate-data,
    param-report, eval and generate use it when given no data; without --train, tokenize takes it too.
    """
    from lora_cli.cli.render import RichReporter, err, out, table
    from lora_cli.data.current import resolve
    from lora_cli.errors import LoraCliError

    if show < 0:
        raise LoraCliError(f"--show must be at least 0, not {show}.")
    work = resolve("tokenize", settings, str(config) if config else None, set_)  # paths checked before torch loads
    if work.said:
        err.print(work.said, markup=False, soft_wrap=True)
    from lora_cli.data.precheck import refuse_invalid_records

    refuse_invalid_records(work.cfg)
    from lora_cli.data.prepare import prepare_data
    from lora_cli.data.show import show_examples
    from lora_cli.model.load import quiet_libraries

    quiet_libraries()
    cfg = work.cfg
    data = prepare_data(cfg, RichReporter(), force=force, record=True)
    entries = [e for e in (data.train, data.val) if e is not None]
    shown = show_examples(data.train.load(), data.tokenizer, show) if show else []
    if as_json:
        typer.echo(json.dumps([{"split": e.split, "key": e.key, "path": str(e.path), "cache_hit": e.hit,
                                "counts": asdict(e.meta.counts), "left_out_lines": e.meta.left_out_lines,
                                **({"shown": [asdict(x) for x in shown]} if e.split == "train" and show else {})}
                               for e in entries], indent=2))
        return
    rows = [[e.split, "cache hit" if e.hit else "built", c.examples, c.tokens, c.targets, c.truncated, c.no_target,
             c.invalid, str(e.path)] for e in entries for c in [e.meta.counts]]
    out.print(table(f"tokenize ({cfg.model.name}, template {cfg.data.template}, max length {cfg.data.max_length})",
                    ["split", "status", "examples", "tokens", "target tokens", "truncated", "left out", "skipped",
                     "cache entry"], rows, right=(2, 3, 4, 5, 6, 7)))
    for e in entries:  # left-out examples and warnings: prepare_data told the reporter
        out.print(f"{e.split}: {'cache hit' if e.hit else 'tokenized'} ({e.key})")
    out.print(f"Recorded as the current dataset ({data.current.file}): lora-cli train, validate-data, "
              "param-report, eval and generate use it when given no data.")
    print_shown(shown)


def print_shown(shown: list) -> None:
    """Examples as spans: in a terminal, styles (prompt dim, trained tokens green, eos magenta); elsewhere
    a bracketed plain form, [prompt]...[/prompt] [trained]...[/trained] with each eos written <eos>."""
    from rich.text import Text

    from lora_cli.cli.render import out

    if not shown:
        return
    if out.is_terminal:
        out.print(Text.assemble("Legend: ", ("prompt (no loss)", "dim"), ", ", ("trained tokens", "bold green"),
                                ", ", ("<eos>", "bold magenta"), " the eos token"))
    for example in shown:
        out.print(f"example from line {example.line}: {example.tokens} tokens, {example.trained_tokens} trained",
                  markup=False, highlight=False)
        if out.is_terminal:
            text = Text()
            for span in example.spans:
                style = "bold magenta" if span.eos else "bold green" if span.trained else "dim"
                text.append("<eos>" if span.eos else span.text, style=style + (" underline" if span.eos and
                                                                                 span.trained else ""))
            out.print(text)
        else:
            out.print(_plain(example.spans), markup=False, highlight=False, soft_wrap=True)


def _plain(spans: list) -> str:
    """Runs of spans with the same trained state in one bracket: [trained]Paris.<eos>[/trained]."""
    runs = itertools.groupby(spans, key=lambda span: "trained" if span.trained else "prompt")
    return "".join(f"[{tag}]" + "".join("<eos>" if s.eos else s.text for s in run) + f"[/{tag}]" for tag, run in runs)
