"""`lora-cli export`: the merged model as GGUF (or the adapter as a GGUF LoRA, or GGUF + Ollama Modelfile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import AdapterOpt, BaseModelOpt, TemplateOverrideOpt, print_notes

MAX_NEW_TOKENS = 64
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", "-d", show_default=False,
    help="Held-out records (JSONL, training format) for the check; default: the adapter's validation file.")]
BaseGgufOpt = Annotated[Optional[Path], typer.Option(
    "--base-gguf", show_default=False,
    help="The base model's GGUF that a gguf-lora export is checked on (smollm2-135m: its own file).")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", help="llama.cpp (through llama-cpp-python, the runtime extra), or transformers' own GGUF loader "
                      "(no llama.cpp needed, but not the runtime the export is for).")]


def export(
    adapter: AdapterOpt = Path("adapters"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="gguf: the merged model; gguf-lora: the adapter alone; "
                                                           "ollama: a folder with the GGUF and a Modelfile.")] = "gguf",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The .gguf file to write (a folder for --format ollama).", show_default=False)] = None,
    outtype: Annotated[str, typer.Option(
        "--outtype", help="f16, bf16, q8_0, q4_0 or f32 (gguf-lora: not q4_0). A merged q8_0 model keeps its "
                          "attention value and FFN down matrices, the most sensitive to 8-bit rounding, in f16 "
                          "(a file about 20% larger than all-q8_0).")] = "f16",
    base_weights: Annotated[str, typer.Option(
        "--base-weights", help="auto: the NF4 weights a QLoRA adapter was trained against (de-quantized; for q4_0 "
                               "the original ones), else the original ones; original; nf4.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing GGUF file (or exported folder).")] = False,
    model: BaseModelOpt = None,
    template: TemplateOverrideOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Then compare the export, run in llama.cpp, with the "
                                                        "trained model (as `lora-cli check-export` does).")] = False,
    data: DataOpt = None,
    base_gguf: BaseGgufOpt = None,
) -> None:
    """Export for llama.cpp / Ollama: GGUF with the tokenizer and the training prompt's chat template."""
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.atomic import check_new_file
    from lora_cli.cli.render import RichReporter
    from lora_cli.errors import LoraCliError
    from lora_cli.export.runner import export as run

    if output is None:
        example = "-o ollama-model" if fmt == "ollama" else "-o model.gguf"
        raise LoraCliError("No output given.", f"Pass {example} (--force replaces an earlier export).")
    check_new_file(output, True, "-o", (data, base_gguf, adapter))  # replacing is the runner's call; an input, never
    with open_adapter(adapter, model, template) as info:
        print_notes(info)
        plan = check_plan(info, fmt == "gguf-lora", data, base_gguf, "llama.cpp") if check else None  # refusals first
        result = run(info, output, fmt, outtype, base_weights, force, RichReporter())
        if not as_json:
            _print_summary(adapter, result)
        report = run_check(info, Path(result.output), *plan, "llama.cpp", MAX_NEW_TOKENS) if check else None
    if as_json:
        typer.echo(json.dumps(dict(result.__dict__, **({"check": report.to_dict()} if report else {})), indent=2))
    elif report:
        print_check(report)
    if report and report.verdict == "fail":
        raise typer.Exit(1)


def _print_summary(adapter: Path, result) -> None:
    from lora_cli.cli.render import out

    types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensors.items()))
    weights = f", {result.base_weights} base weights" if result.base_weights else ""
    out.print(f"Exported {adapter} ({result.base_model}, {result.architecture}{weights}, template {result.template}) "
              f"as {result.format} {result.outtype} in {result.seconds:.1f} s.", markup=False)
    listing = f": {', '.join(result.files)}" if result.format == "ollama" else ""
    out.print(f"Wrote {result.output}{listing} ({result.size_bytes / 1e6:.1f} MB; tensors: {types})", markup=False)
    if result.format == "gguf-lora":
        out.print(f"The adapter carries no chat template: prompt the base GGUF with the {result.template} template "
                  f"(the user message: {result.prompt}).", markup=False)
    else:
        out.print(f"Prompt (the user message): {result.prompt}", markup=False)
    if result.stops:
        out.print(f"Stops: {', '.join(json.dumps(s) for s in result.stops)}; greedy (temperature 0)", markup=False)
    if result.ollama_create:
        out.print(f"Import into Ollama: {result.ollama_create}", markup=False)


def check_export(
    artifact: Annotated[Path, typer.Argument(help="What lora-cli export wrote: a .gguf file or an ollama folder.",
                                             show_default=False)],
    adapter: AdapterOpt = Path("adapters"),
    data: DataOpt = None,
    base_gguf: BaseGgufOpt = None,
    runtime: RuntimeOpt = "llama.cpp",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n",
                                                help="Generation cap for the greedy answers and the stop rate.")]
    = MAX_NEW_TOKENS,
    model: BaseModelOpt = None,
    template: TemplateOverrideOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (with every answer) as JSON.")] = False,
) -> None:
    """Run an export in llama.cpp and compare it with the trained model: prompt tokens, next-token agreement,
    greedy answers and stop rate, with a verdict (exit 1 on fail) and a JSON report beside the export."""
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.errors import LoraCliError
    from lora_cli.export.check_artifact import artifact_kind

    if max_new_tokens < 1:
        raise LoraCliError(f"--max-new-tokens must be at least 1, not {max_new_tokens}.")
    if runtime not in RUNTIMES:
        raise LoraCliError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}.")
    with open_adapter(adapter, model, template) as info:
        print_notes(info)
        plan = check_plan(info, artifact_kind(artifact) == "gguf-lora", data, base_gguf, runtime)
        report = run_check(info, artifact, *plan, runtime, max_new_tokens)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_check(report)
    if report.verdict == "fail":
        raise typer.Exit(1)


RUNTIMES = ("llama.cpp", "transformers")


def check_plan(info, lora: bool, data: Path | None, base_gguf: Path | None, runtime: str) -> tuple[Path, Path | None]:
    """The records and base GGUF the check will use; every refusal before a model loads or an export is written."""
    from lora_cli.adapter.folder import read_saved_run
    from lora_cli.errors import LoraCliError
    from lora_cli.export.check_artifact import default_base_gguf
    from lora_cli.export.check_runtimes import RUNTIME_EXTRA, llama_cpp_available

    if runtime == "llama.cpp" and not llama_cpp_available():
        raise LoraCliError("Checking an export in llama.cpp needs llama-cpp-python, which is not installed.",
                           f"Install it with: {RUNTIME_EXTRA}  (it compiles llama.cpp: 10-20 minutes on 2 cores), "
                           "or check with transformers' GGUF loader now: --runtime transformers.")
    if lora and runtime != "llama.cpp":
        raise LoraCliError("A gguf-lora export runs in llama.cpp only (transformers loads no GGUF adapter).")
    if data is None:
        saved = read_saved_run(info.path) if info.path else None
        val = saved.data.val if saved is not None else None
        if not val or not Path(val).is_file():
            raise LoraCliError("No records to check the export on.",
                               "Pass --data val.jsonl (held-out records in the training format).")
        data = Path(val)
    elif not data.is_file():
        raise LoraCliError(f"--data {data} does not exist.")
    if lora and base_gguf is None:
        base_gguf = default_base_gguf(info.base_model)
        if base_gguf is None:
            raise LoraCliError("A gguf-lora export is checked on the base model's GGUF.",
                               f"Pass --base-gguf with the GGUF of {info.base_model}.")
    return data, base_gguf


def run_check(info, artifact_path: Path, data: Path, base_gguf: Path | None, runtime: str, max_new_tokens: int):
    """Load the trained model as eval does, the export in `runtime`; compare them; write the JSON report."""
    from lora_cli.cli.render import RichReporter
    from lora_cli.data.tokenization import token_counts
    from lora_cli.export.check import check_export as compare
    from lora_cli.export.check import write_report
    from lora_cli.export.check_artifact import open_artifact
    from lora_cli.export.check_runtimes import TransformersRuntime, open_runtime
    from lora_cli.infer.evaluation import read_examples
    from lora_cli.infer.generation import load_for_inference

    artifact = open_artifact(artifact_path, base_gguf)
    examples = read_examples(data)
    reporter = RichReporter()
    # fp32 arithmetic: bf16's rounding (eval's choice on CPUs with fast bf16) would be counted against the export
    loaded = load_for_inference(info, precision="fp32", reporter=reporter)
    loaded.check_records(examples, str(data))
    weights = "4-bit NF4, fp32 arithmetic" if info.quantization == "nf4" else "fp32"
    reference = TransformersRuntime(loaded.model, loaded.tokenizer, loaded.stop_ids,
                                    f"transformers: {info.base_model} ({weights}) + {info.path.name}")
    n_ctx = max(c.length for c in token_counts(examples, loaded.tokenizer, loaded.template)) + max_new_tokens + 8
    with reporter.stage(f"Loading {artifact.model_file.name} in {runtime}"):
        engine = open_runtime(runtime, artifact, n_ctx)
    try:
        report = compare(artifact, engine, reference, loaded.tokenizer, loaded.template, examples,
                         add_eos=info.add_eos, max_length=info.max_length, max_new_tokens=max_new_tokens,
                         data=str(data), reporter=reporter)
    finally:
        getattr(engine, "close", lambda: None)()
    report.report_file = write_report(report)
    return report


def print_check(report) -> None:
    from rich.markup import escape

    from lora_cli.cli.commands.inference_options import plain_table
    from lora_cli.cli.render import out

    n = report.records
    rows = [["export", f"{report.kind}, {report.weight_type} weights, in {report.runtime}"],
            ["compared with", report.reference],
            ["prompt tokens identical", f"{report.prompts_identical}/{n}"],
            ["next-token agreement (teacher-forced)", f"{report.agree}/{report.positions} ({report.agreement:.2%}; "
                                                      f"target {report.agreement_target:.0%})"],
            ["largest logit difference", f"{report.max_logit_diff:.2%} of the largest logit"],
            ["greedy answers identical", f"{report.answers_identical}/{n} (text shared before the first "
                                         f"difference: {report.mean_shared_prefix:.0%} on average)"],
            ["stop rate", f"trained {report.trained_stopped}/{n}, export {report.export_stopped}/{n} (within "
                          f"{report.max_new_tokens} new tokens)"]]
    out.print(plain_table(f"check-export: {report.artifact} on {report.data}", ["measure", "value"], rows))
    colour = {"pass": "green", "warn": "yellow", "fail": "red"}[report.verdict]
    out.print(f"[bold {colour}]{report.verdict.upper()}[/]" + ("" if report.reasons else
                                                               ": the export behaves as the trained model."))
    for reason in report.reasons:
        out.print(f"  {reason.level} ({reason.kind}): {escape(reason.message)}", soft_wrap=True)
    out.print(f"Report: {escape(report.report_file)}", soft_wrap=True)
