"""The two runtimes the export check compares: transformers (the trained model, or a GGUF it loads)
and llama.cpp (through llama-cpp-python, the optional extra `lora-cli[runtime]`).

Both answer the same four questions (check.Runtime): the ids of a prompt text, the next-token
logits at every position of an id sequence, greedy generation with stops, and the text of ids.
Greedy is argmax over the logits, one token at a time, in both: no sampler stands between the
model and the answer, so the two sides differ only in their numbers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_cli.data.tokenization import special_prefix
from lora_cli.errors import LoraCliError
from lora_cli.export.check_artifact import gguf_fields

RUNTIME_EXTRA = "pip install 'lora-cli[runtime]'"


@dataclass
class Generation:
    text: str
    stopped: bool  # an end-of-generation token or a stop text came within max_new_tokens


def _cut_at_stop_text(text: str, stop_texts: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop_texts if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


class TransformersRuntime:
    """A transformers causal LM and its tokenizer; `stop_ids`: what its generation ends on (eval's stop ids)."""

    def __init__(self, model, tokenizer, stop_ids: list[int], name: str = "transformers", add_bos: bool | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.stop_ids = list(stop_ids)
        self.add_bos = bool(special_prefix(tokenizer)) if add_bos is None else add_bos
        self.bos_id = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token or ""
        self.device = next(model.parameters()).device

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + list(ids)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def logits(self, ids: list[int]):
        """[len(ids), vocab] float32 numpy: the next-token logits after each position."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_texts: list[str]) -> Generation:
        import torch

        new: list[int] = []
        past, step_ids = None, torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=step_ids, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                if token in self.stop_ids:
                    return Generation(self.tokenizer.decode(new, skip_special_tokens=True), True)
                new.append(token)
                text, hit = _cut_at_stop_text(self.detokenize(new), stop_texts)
                if hit:
                    return Generation(text, True)
                step_ids = torch.tensor([[token]], device=self.device)
        return Generation(self.tokenizer.decode(new, skip_special_tokens=True), False)


def gguf_transformers_runtime(model_file: Path) -> TransformersRuntime:
    """A GGUF loaded by transformers (de-quantized to fp32): the artifact side of the always-run tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = gguf_fields(model_file)
    tok = AutoTokenizer.from_pretrained(str(model_file.parent), gguf_file=model_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(model_file.parent), gguf_file=model_file.name).eval()
    stops = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return TransformersRuntime(model, tok, stops, f"transformers (GGUF {model_file.name})",
                               add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppRuntime:
    """A GGUF (and a GGUF LoRA adapter on it) in llama.cpp, through llama-cpp-python (the commands refuse,
    naming RUNTIME_EXTRA, before one is made without it: cli/commands/export.py check_plan)."""

    def __init__(self, model_file: Path, lora_file: Path | None = None, n_ctx: int = 2048, threads: int | None = None):
        import llama_cpp

        self.name = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        try:
            self.llm = llama_cpp.Llama(model_path=str(model_file), lora_path=str(lora_file) if lora_file else None,
                                       n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                                       n_threads=threads, seed=0)
        except (ValueError, RuntimeError) as exc:
            what = f"{model_file} with the adapter {lora_file}" if lora_file else str(model_file)
            raise LoraCliError(f"llama.cpp cannot load {what}: {exc}") from None
        vocab = self.llm._model.vocab
        self.stop_ids = [i for i in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_id = self.llm.token_bos()
        self.bos_text = self.detokenize([self.bos_id]) if self.bos_id >= 0 else ""

    def close(self) -> None:
        """Free the model now: llama-cpp-python's own finalizer, left to interpreter exit, prints a TypeError."""
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_texts: list[str]) -> Generation:
        self.llm.reset()
        self.llm.eval(ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if token in self.stop_ids:
                return Generation(self.llm.detokenize(new).decode("utf-8", errors="replace"), True)
            new.append(token)
            text, hit = _cut_at_stop_text(self.detokenize(new), stop_texts)
            if hit:
                return Generation(text, True)
            self.llm.eval([token])
        return Generation(self.llm.detokenize(new).decode("utf-8", errors="replace"), False)


def open_runtime(kind: str, artifact, n_ctx: int):
    """The runtime that runs `artifact`: "llama.cpp", or "transformers" (its GGUF loader; no adapters)."""
    if kind == "transformers":
        return gguf_transformers_runtime(artifact.model_file)
    return LlamaCppRuntime(artifact.model_file, artifact.lora_file, n_ctx)
