"""`lora-cli generate`: answers from base + adapter, prompted exactly as training prompted.

One prompt streams to the terminal; `--input FILE.jsonl` answers many records in batches
(a table, or JSONL with --json / --output); `--compare` puts the base model's answers beside
the adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import (
    AdapterOpt,
    BatchOpt,
    LoadChoice,
    MaxNewOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    loaded_model,
    with_load_options,
)


def _check_args(prompt, input_file, compare, base_only) -> None:
    from lora_cli.errors import LoraCliError

    if prompt is not None and input_file is not None:
        raise LoraCliError("Give either a PROMPT or --input FILE.jsonl (exactly one of them).",
                           'Example: lora-cli generate --adapter adapters "Name three colors."')
    if prompt is not None and not prompt.strip():
        raise LoraCliError("The prompt is empty.")
    if compare and base_only:
        raise LoraCliError("--compare and --base-only cannot be used together.")


def _rows(examples, answers, base_answers) -> list[dict]:
    from lora_cli.data.tokenization import reference_answer

    rows = []
    for i, ex in enumerate(examples):
        row = {"line": ex.line} if ex.line else {}
        row.update({"messages": ex.messages[:-1]} if ex.is_chat else {"instruction": ex.instruction, "input": ex.input})
        if ex.line and reference_answer(ex):  # a prompt without an answer has no reference
            row["reference"] = reference_answer(ex)
        row.update(answer=answers[i].text, stopped=answers[i].stopped, new_tokens=len(answers[i].token_ids))
        if base_answers is not None:
            row.update(base_answer=base_answers[i].text, base_stopped=base_answers[i].stopped)
        rows.append(row)
    return rows


def _prompt_text(row: dict) -> str:
    if "messages" in row:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    return row["instruction"] + (f"\n[input] {row['input']}" if row["input"].strip() else "")


def _print_table(rows: list[dict], compare: bool, title: str) -> None:
    from lora_cli.cli.commands.inference_options import plain_table
    from lora_cli.cli.render import out

    if compare:
        yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
        body = [[r.get("line", ""), _prompt_text(r), r["base_answer"], r["answer"],
                 f"{yes_no(r['base_stopped'])} / {yes_no(r['stopped'])}"] for r in rows]
        out.print(plain_table(title, ["line", "prompt", "base model", "adapter", "eos (base / adapter)"], body))
        return
    body = [[r.get("line", ""), _prompt_text(r), r["answer"], "yes" if r["stopped"] else "no"] for r in rows]
    out.print(plain_table(title, ["line", "prompt", "answer", "eos"], body))


def _answer_all(loaded, prompts, params, batch_size: int, compare: bool):
    from lora_cli.cli.render import RichReporter
    from lora_cli.infer.generation import generate as run

    reporter = RichReporter()
    base = None
    if compare:
        with reporter.stage("Generating (base model)", total=len(prompts), unit="answers") as bar:
            base = run(loaded, prompts, params, batch_size, use_adapter=False, on_batch=bar.update)
    name = "base model" if not loaded.has_adapter else "adapter"
    with reporter.stage(f"Generating ({name})", total=len(prompts), unit="answers") as bar:
        answers = run(loaded, prompts, params, batch_size, on_batch=bar.update)
    return answers, base


def _emit(rows: list[dict], single: bool, compare: bool, as_json: bool, output_file: Path | None, title: str) -> None:
    from lora_cli.atomic import write_text
    from lora_cli.cli.render import err, out

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output_file is not None:
        write_text(output_file, lines)
        err.print(f"Wrote {len(rows)} answer(s) to {output_file}", markup=False)
    if as_json:
        typer.echo(lines, nl=False)
    elif single and not compare:
        out.print(rows[0]["answer"], markup=False, highlight=False, soft_wrap=True)
        err.print(f"({'eos' if rows[0]['stopped'] else 'no eos'} after {rows[0]['new_tokens']} tokens)", markup=False)
    elif output_file is None:
        _print_table(rows, compare, title)


@with_load_options
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The instruction to answer.", show_default=False)] = None,
    adapter: AdapterOpt = Path("adapters"),
    input_file: Annotated[Optional[Path], typer.Option(
        "--input", "-i", help="Answer every record of this JSONL file (training format). [default without a PROMPT: "
                              "the current dataset's validation file]", show_default=False)] = None,
    output_file: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the answers as JSONL.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answers as JSONL on stdout.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Show the base model's answers beside the adapter's.")] = False,
    base_only: Annotated[bool, typer.Option("--base-only", help="Answer with the base model alone (without an adapter folder: name it with --model).")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream a single answer as it is produced.")] = True,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    batch_size: BatchOpt = 8,
    load: LoadChoice = LoadChoice(),
) -> None:
    """Answer a prompt (or every record of --input) with base model + adapter; greedy unless --temperature.

    With neither: every record of the current dataset's validation file (what lora-cli tokenize --val
    tokenized last).
    """
    from lora_cli.atomic import check_new_file
    from lora_cli.cli.render import err, out
    from lora_cli.data.current import resolve
    from lora_cli.data.records import Example
    from lora_cli.infer.evaluation import read_examples
    from lora_cli.infer.generation import Sampling, check_records
    from lora_cli.infer.generation import generate as run

    _check_args(prompt, input_file, compare, base_only)
    if prompt is None and input_file is None:
        work = resolve("generate")
        err.print(work.said, markup=False, soft_wrap=True)
        input_file = Path(work.cfg.data.val)
    if output_file is not None:  # before the model loads: refused at once, the file untouched
        check_new_file(output_file, force, "-o", (input_file, adapter))
    params = Sampling(max_new_tokens, temperature, top_p, top_k, seed, load.repetition_penalty, load.no_repeat_ngram_size)
    examples = read_examples(input_file, answers=False) if input_file is not None else [Example(0, prompt)]
    single = prompt is not None
    check = None if input_file is None else lambda tok, template: check_records(examples, tok, template, str(input_file))
    with loaded_model(adapter, load, not base_only, check) as loaded:
        prompts = [loaded.example_prompt(ex) for ex in examples]
        if single and stream and not (compare or as_json or output_file):  # streamed as it is produced
            answer = run(loaded, prompts, params, on_text=lambda text: out.print(
                text, end="", markup=False, highlight=False, soft_wrap=True))[0]
            out.print()
            err.print(f"({'eos after' if answer.stopped else 'no eos within'} {len(answer.token_ids)} tokens)",
                      markup=False)
            return
        answers, base = _answer_all(loaded, prompts, params, batch_size, compare)
        title = f"{loaded.info.base_model} + {loaded.info.path}" if loaded.has_adapter else loaded.info.base_model
    _emit(_rows(examples, answers, base), single, compare, as_json, output_file, title)
