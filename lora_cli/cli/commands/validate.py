"""`lora-cli validate-data`: every defect of a data file, before any GPU time is spent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.options import config_flags


def _token_counter(model: str, template_name: str, at_hand: bool = False):
    """Token counts with `model`'s tokenizer. at_hand (the current dataset's model): only when it is on this
    machine (nothing is downloaded); else None, and said."""
    from lora_cli.cli.render import err
    from lora_cli.data.templates import get_template
    from lora_cli.data.tokenization import token_counts
    from lora_cli.errors import LoraCliError
    from lora_cli.model.load import load_tokenizer, quiet_libraries
    from lora_cli.model.resolve import resolve_model

    quiet_libraries()
    try:
        tokenizer = load_tokenizer(resolve_model(model, need_weights=False, local_only=at_hand).path)
        template = get_template(template_name)
    except LoraCliError as exc:
        if not at_hand:
            raise
        err.print(f"Token statistics left out: {exc.message}", markup=False, soft_wrap=True)
        return None
    return lambda examples: token_counts(examples, tokenizer, template)


def _print_reports(reports: list, limit: int, failed: bool) -> None:
    """The table (character and, with a model, token lengths per file) and the verdict."""
    from lora_cli.cli.render import err, out, table

    with_tokens = any(r.tokens is not None for r in reports)
    rows = [[r.file, r.records, r.valid, r.errors, r.warnings, stats.unit, f"{stats.mean:.1f}", f"{stats.p50:.0f}",
             f"{stats.p90:.0f}", stats.max]  # a row per length unit; with a model, the token row's truncation
            + (([r.truncated, r.left_out] if stats.unit == "tokens" else ["", ""]) if with_tokens else [])
            for r in reports for stats in (r.chars, r.tokens) if stats is not None]
    columns = ["file", "records", "valid", "errors", "warnings", "length", "mean", "p50", "p90", "max"]
    if with_tokens:
        columns += [f"> {limit} tokens", "left out"]
    out.print(table("validate-data", columns, rows, right=(1, 2, 3, 4, 6, 7, 8, 9, 10, 11)))
    for r in reports:
        if r.records == 0 and not r.errors:
            err.print(f"[red]error[/] {r.file}: holds no records.", markup=True)
    verdict = "[red]defects found[/]" if failed else "[green]clean[/]" + (
        " [yellow](with warnings)[/]" if any(r.warnings for r in reports) else "")
    out.print(f"{len(reports)} file(s): {verdict}", markup=True)


@config_flags("model.name", "data.template", "data.max_length", "data.cache_dir")
def validate_data(
    settings: dict,
    files: Annotated[Optional[list[Path]], typer.Argument(help="JSONL files to check [default: the current dataset's "
                                                               "files, as lora-cli tokenize recorded them].",
                                                          show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON report for machines.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too (duplicates, look-alike field names, left-out examples).")] = False,
) -> None:
    """Report every defect (file, line, field, reason), duplicates, and length statistics.

    With --model, also token lengths, how many examples --max-length would truncate, and which it
    would leave out (a prompt that fills it leaves no response token: a warning). Reads JSON Lines
    and JSON arrays; a compressed, binary or non-UTF-8 file is one error saying how to convert it.
    With no file: the current dataset's files (what lora-cli tokenize tokenized last), with its
    model's token lengths when the model is on this machine. Exit 0 when every file is clean, 1 when not.
    """
    from lora_cli.cli.render import err, out, print_issues
    from lora_cli.config import RunConfig
    from lora_cli.data.current import resolve
    from lora_cli.data.report import cross_file_issues, validate_file

    typed_model, current = "model.name" in settings, not files
    if current:  # the current dataset's files, model, template and max length, under the typed flags
        work = resolve("validate-data", settings)
        err.print(work.said, markup=False, soft_wrap=True)
        cfg = work.cfg
        files = [Path(p) for p in (cfg.data.train, cfg.data.val) if p]
    else:
        cfg = RunConfig().replace(settings)
    counter = (_token_counter(cfg.model.name, cfg.data.template, at_hand=not typed_model)
               if typed_model or current else None)  # the current dataset's model: only when it is at hand
    limit = cfg.data.max_length
    if counter is None and not current:  # the current dataset's model not at hand: _token_counter said so
        err.print(f"Token lengths not checked: pass --model NAME to count them and name the records --max-length "
                  f"({limit} tokens) would cut.", markup=False, soft_wrap=True)
    stream = None if as_json else (lambda issue: print_issues([issue], out))
    reports = [validate_file(path, on_issue=stream, token_counts=counter, max_length=limit if counter else None)
               for path in files]
    shared_records = cross_file_issues(reports)  # validation records that are also training records
    if not as_json:
        print_issues(shared_records, out)
    for issue in shared_records:
        next(r for r in reports if r.file == issue.file).issues.append(issue)
    failed = any(r.errors or r.records == 0 or (strict and r.warnings) for r in reports)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "files": [r.to_dict() for r in reports]}, indent=2))
    else:
        _print_reports(reports, limit, failed)
    raise typer.Exit(1 if failed else 0)
