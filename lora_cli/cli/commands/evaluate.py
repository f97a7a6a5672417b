"""`lora-cli eval`: response loss, perplexity and stop rate of an adapter (or its base) on held-out data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import (
    AdapterOpt,
    BatchOpt,
    LoadChoice,
    loaded_model,
    with_load_options,
)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shorten(text: str, limit: int = 300, lines: int = 8) -> str:
    """Long (often looping) answers are cut in the table, at `limit` characters or `lines` lines,
    whichever comes first (a loop of short lines is long in rows, not in characters); --json keeps
    every character."""
    kept = "\n".join(text.split("\n")[:lines])[:limit]
    return text if kept == text else kept.rstrip() + " [...]"


def _how(sampling: dict) -> str:
    """How the answers were picked (Sampling.to_dict, filled whenever eval generated): greedy, plus any
    repetition option (they change answers, not the loss)."""
    parts = ["greedy" if sampling["greedy"] else f"sampled (temperature {sampling['temperature']})"]
    if sampling["repetition_penalty"] != 1.0:
        parts.append(f"repetition penalty {sampling['repetition_penalty']:g}")
    if sampling["no_repeat_ngram_size"]:
        parts.append(f"no repeated {sampling['no_repeat_ngram_size']}-grams")
    return ", ".join(parts)


def print_result(result, show: int) -> None:
    from lora_cli.cli.commands.inference_options import plain_table
    from lora_cli.cli.render import out

    rows = [["records", result.examples], ["response tokens scored", f"{result.response_tokens:,}"],
            ["response loss (with eos)", _fmt(result.loss, ".4f")], ["perplexity", _fmt(result.perplexity, ".2f")],
            ["response loss (text only)", _fmt(result.loss_text, ".4f")]]
    if result.stop_rate is not None:
        rows.append(["stop rate", f"{result.stop_rate:.1%} ({result.stopped}/{result.examples} end with eos "
                                  f"within {result.max_new_tokens} new tokens)"])
        rows.append(["generation", f"{_how(result.sampling)}, {result.generate_seconds:.1f} s"])
    if result.truncated:
        rows.append(["truncated at max length", result.truncated])
    if result.left_out:
        rows.append(["left out (prompt fills max length)", result.left_out])
    out.print(plain_table(f"eval: {result.model} on {result.data}", ["metric", "value"], rows))
    if show and result.answers:
        body = [[a["line"], a["prompt"], _shorten(a["answer"]), "yes" if a["stopped"] else "no"]
                for a in result.answers[:show]]
        out.print(plain_table(f"First {min(show, len(result.answers))} answers ({_how(result.sampling)})",
                              ["line", "prompt", "answer", "eos"], body))


@with_load_options
def evaluate(
    adapter: AdapterOpt = Path("adapters"),
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Held-out records (JSONL, training format). "
                                                 "[default: the current dataset's validation file]",
                                                 show_default=False)] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Measure the base model alone (the 'before').")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (with every answer) as JSON.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n",
                                                help="Generation cap for the stop rate.")] = 128,
    loss_only: Annotated[bool, typer.Option("--loss-only", help="Skip generation (no stop rate).")] = False,
    show: Annotated[int, typer.Option("--show", help="Print this many answers under the table.")] = 3,
    batch_size: BatchOpt = 8,
    load: LoadChoice = LoadChoice(),
) -> None:
    """Mean loss and perplexity on response tokens, and the share of greedy answers that stop (eos) in time.

    Without --data: the current dataset's validation file (what lora-cli tokenize --val tokenized last).
    """
    from lora_cli.cli.render import RichReporter, err
    from lora_cli.data.current import resolve
    from lora_cli.errors import LoraCliError
    from lora_cli.infer.evaluation import evaluate as run
    from lora_cli.infer.evaluation import read_examples
    from lora_cli.infer.generation import Sampling, check_batch_size, check_records

    if data is None:
        work = resolve("eval")
        err.print(work.said, markup=False, soft_wrap=True)
        data = Path(work.cfg.data.val)
    if show < 0:
        raise LoraCliError(f"--show must be at least 0, not {show}.")
    params = Sampling(max_new_tokens=max_new_tokens, repetition_penalty=load.repetition_penalty,
                      no_repeat_ngram_size=load.no_repeat_ngram_size)  # its checks, before the model loads
    check_batch_size(batch_size)
    examples = read_examples(data)
    check = lambda tok, template: check_records(examples, tok, template, str(data))  # noqa: E731 (before loading)
    with loaded_model(adapter, load, not base_only, check) as loaded:
        result = run(loaded, examples, str(data), max_new_tokens, batch_size, stop_rate=not loss_only,
                     reporter=RichReporter(), sampling=params)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
    else:
        print_result(result, show)
