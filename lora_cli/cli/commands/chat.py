"""`lora-cli chat`: an interactive, multi-turn conversation with base model + adapter.

Each turn is prompted through `encode_prompt` with the whole history, rendered as training
renders multi-turn records, and streamed as it is produced. The oldest turns are dropped
when the history no longer fits the model's context. `/exit` or Ctrl-D leaves, `/reset`
starts over, Ctrl-C during an answer stops that answer only.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import (
    AdapterOpt,
    LoadChoice,
    MaxNewOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    loaded_model,
    with_load_options,
)

EXIT = ("/exit", "/quit")
RESET = "/reset"
USER_PROMPT = "you> "


def _read_line() -> str | None:
    """One line from the user, or None at end of input (Ctrl-D). In a terminal, readline gives
    line editing and history; Ctrl-C at the prompt leaves like any interrupted program."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    try:
        return input(USER_PROMPT)
    except EOFError:
        return None


def chat_loop(loaded, params, system: str | None) -> None:
    """Run the conversation until /exit or end of input."""
    from lora_cli.cli.render import err, out
    from lora_cli.infer.generation import fit_history, generate

    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        line = _read_line()
        if line is None:
            out.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT:
            break
        if text == RESET:
            history = list(start)
            err.print("(history cleared)", markup=False)
            continue
        history.append({"role": "user", "content": text})
        ids, dropped = fit_history(loaded, history, params.max_new_tokens)
        if dropped:
            err.print(f"(dropped the {dropped} oldest exchange(s) to fit the context)", markup=False)
        try:
            answer = generate(loaded, [ids], params, on_text=lambda piece: out.print(
                piece, end="", markup=False, highlight=False, soft_wrap=True))[0]
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            out.print()
            err.print("(answer interrupted and left out of the history)", markup=False)
            history.pop()
            continue
        out.print()
        if not answer.stopped:
            err.print(f"(cut at --max-new-tokens {params.max_new_tokens}: no eos)", markup=False)
        history.append({"role": "assistant", "content": answer.text})


@with_load_options
def chat(
    adapter: AdapterOpt = Path("adapters"),
    system: Annotated[Optional[str], typer.Option("--system", help="A system message to start the conversation.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Chat with the base model alone.")] = False,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    load: LoadChoice = LoadChoice(),
) -> None:
    """Talk to base model + adapter, turn by turn, with streamed answers. /exit or Ctrl-D leaves, /reset starts over."""
    from lora_cli.cli.render import err
    from lora_cli.data.tokenization import check_system_message
    from lora_cli.infer.generation import Sampling

    params = Sampling(max_new_tokens, temperature, top_p, top_k, seed, load.repetition_penalty, load.no_repeat_ngram_size)
    check = (lambda tokenizer, template: check_system_message(system, tokenizer, template)) if system else None
    with loaded_model(adapter, load, not base_only, check) as loaded:
        who = f"{loaded.info.base_model} + {loaded.info.path}" if loaded.has_adapter else loaded.info.base_model
        err.print(f"Chatting with {who} (template {loaded.info.template}). /exit or Ctrl-D to leave, "
                  "/reset to start over.", markup=False, soft_wrap=True)
        chat_loop(loaded, params, system)
