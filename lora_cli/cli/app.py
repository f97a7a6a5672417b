"""The `lora-cli` command line: one Typer app, one small module per command.

This module imports neither torch nor transformers: `lora-cli --help` stays instant. Errors
the user can act on (`LoraCliError`) are printed as one message and exit 1 (130 for an
interrupted run); anything else is reported as an internal error, with the traceback only
when LORA_CLI_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from lora_cli import __version__
from lora_cli.cli.suggest import SuggestingGroup
from lora_cli.errors import LoraCliError

app = typer.Typer(
    name="lora-cli",
    help="QLoRA fine-tuning from instruction data: check and tokenize it, train an adapter, report, package, "
         "use (generate, chat, eval), merge and export it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=SuggestingGroup,  # an unknown flag: suggestions by meaning as well as spelling
)


def _report(exc: LoraCliError) -> typer.Exit:
    """Print an error the user can act on (message, hint, data defects, resume command); the exit to raise."""
    from rich.markup import escape

    from lora_cli.cli.render import err, print_issues

    err.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True, soft_wrap=True)
    if exc.hint:
        err.print(exc.hint, markup=False, soft_wrap=True)
    print_issues(getattr(exc, "issues", None) or [], err)
    extra = getattr(exc, "resume_command", None)
    if extra:
        err.print(f"Resume with:\n  {extra}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def handle_errors(fn):
    """Turn the core's exceptions into messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lora_cli.cli.render import err

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LoraCliError as exc:
            raise _report(exc) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so plainly
            if os.environ.get("LORA_CLI_DEBUG"):
                raise
            from rich.markup import escape

            from lora_cli.atomic import filesystem_failure
            from lora_cli.errors import OutOfMemory
            from lora_cli.train.oom import is_oom, oom_message

            # a file that could not be written or read where the core did not expect it (a read-only
            # folder, a file too large for its file system, a file in the path): one line naming the path;
            # out of memory outside the training loop (loading the model): no settings to quote
            failure = filesystem_failure(exc) or (OutOfMemory(oom_message(exc)) if is_oom(exc) else None)
            if failure is not None:
                raise _report(failure) from None
            err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                      "This is a bug in lora-cli; set LORA_CLI_DEBUG=1 to see the traceback.")
            raise typer.Exit(2) from None

    return wrapper


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lora-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, metavar="",
                                 help="Print the version and exit."),  # metavar "": a switch, not "<bool>"
) -> None:
    """QLoRA fine-tuning from instruction data."""


# command -> its function (lora_cli.cli.commands module:function), in the order --help lists them
COMMANDS = {"validate-data": "validate:validate_data", "tokenize": "tokenize:tokenize", "train": "train:train",
            "param-report": "param_report:param_report", "package": "package:package",
            "generate": "generate:generate", "chat": "chat:chat", "eval": "evaluate:evaluate", "merge": "merge:merge",
            "export": "export:export", "check-export": "export:check_export", "plot": "plot:plot"}


def _register() -> None:
    import importlib

    from lora_cli.cli.help import PanelledCommand

    for name, target in COMMANDS.items():
        module, _, function = target.partition(":")
        command = getattr(importlib.import_module(f"lora_cli.cli.commands.{module}"), function)
        # PanelledCommand: every command's --help in panels that fit 80 columns
        app.command(name, cls=PanelledCommand)(handle_errors(command))


_register()


def main() -> None:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with
    # other work, spinning threads wait for a descheduled partner at every parallel region: an
    # evaluation measured 52-58 s spinning, 16-19 s sleeping, the same losses (docs/PERFORMANCE.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="lora-cli")


if __name__ == "__main__":
    sys.exit(main())
