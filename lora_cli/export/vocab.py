"""The tokenizer as GGUF metadata (tokenizer.ggml.*), the way llama.cpp's convert_hf_to_gguf.py writes it.

Only byte-level BPE tokenizers ("gpt2" in GGUF terms: Qwen2, SmolLM2, Llama 3, GPT-2) are
written. Their vocabulary, merges, token types (CONTROL for special added tokens, USER_DEFINED for
other added tokens, UNUSED "[PAD<id>]" fillers up to the model's embedding rows), special token
ids and whether a BOS is added are stored; `tokenizer.ggml.pre` names the pre-tokenizer split that
llama.cpp (and transformers' GGUF loader) must apply. The name is read off the tokenizer's own
pre-tokenizer instead of llama.cpp's hash of a sample's tokens: a pre-tokenizer lora-cli cannot
name is refused rather than guessed, since a wrong split silently changes the tokens.
"""

from __future__ import annotations

import json

from gguf import TokenType

from lora_cli.data.tokenization import special_prefix
from lora_cli.errors import LoraCliError

# Regexes of the Split pre-tokenizer in the models' tokenizer.json, and llama.cpp's name for them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
HINT = ("Use --format gguf-lora with a base GGUF made by llama.cpp, or `lora-cli merge` and llama.cpp's "
        "convert_hf_to_gguf.py (which also writes SentencePiece vocabularies).")


def _refuse(why: str) -> LoraCliError:
    return LoraCliError(f"The tokenizer cannot be written into a GGUF: {why}.", HINT)


def _byte_level(item: dict | None, use_regex: bool) -> bool:
    return bool(item) and item.get("type") == "ByteLevel" and not item.get("add_prefix_space") and \
        bool(item.get("use_regex", True)) == use_regex


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json's pre-tokenizer; LoraCliError if none fits."""
    pre = backend.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(items) == 1 and _byte_level(items[0], use_regex=True):
        return "gpt-2"
    if len(items) == 2 and _byte_level(items[1], use_regex=True) and items[0].get("type") == "Digits" \
            and items[0].get("individual_digits"):
        return "smollm"  # digits split one by one, then GPT-2's regex (SmolLM's tokenizer.json)
    if len(items) == 2 and _byte_level(items[1], use_regex=False) and items[0].get("type") == "Split" \
            and str(items[0].get("behavior", "")).lower() == "isolated" and not items[0].get("invert"):
        name = SPLITS.get((items[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise _refuse(f"its pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name lora-cli knows "
                  "(known: GPT-2's, SmolLM's, Qwen2's and Llama 3's)")


def check_tokenizer(tokenizer) -> tuple[dict, str, bool]:
    """(tokenizer.json as a dict, llama.cpp pre-tokenizer name, whether a BOS is added); LoraCliError if unmappable."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    decoder = (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or decoder != "ByteLevel":
        raise _refuse(f"it is a {model.get('type')} tokenizer with a {decoder} decoder, not a byte-level BPE "
                      "(GPT-2 style) one")
    pre = pre_tokenizer_name(backend)
    prefix = special_prefix(tokenizer)
    if prefix not in ([], [tokenizer.bos_token_id]):
        raise _refuse(f"it puts {tokenizer.convert_ids_to_tokens(prefix)} before every text, not just its BOS")
    return backend, pre, bool(prefix)


def add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """Write the tokenizer's tokenizer.ggml.* keys; `vocab_size` is the model's embedding rows."""
    backend, pre, add_bos = check_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise _refuse(f"it has token ids up to {max(vocab.values())}, beyond the model's {vocab_size} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TokenType.UNUSED if i not in by_id else TokenType.NORMAL if i not in added else
             TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers (>= 0.20, as transformers 5 requires) writes [a, b] pairs; llama.cpp wants "a b", a space as Ġ
    writer.add_token_merges([" ".join(part.replace(" ", "\u0120") for part in pair)
                             for pair in (backend.get("model") or {}).get("merges") or []])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if isinstance(token_id, int):
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)  # training appends the eos itself, after the response only
