"""Export a trained adapter for local inference runtimes (llama.cpp, Ollama, anything that reads GGUF).

Formats:
- `gguf`: base + adapter merged (merging.merged_model) and written as one GGUF file with the
  `gguf` package's writer, tensor-name map and quantizers, with the tokenizer, its special tokens
  and a chat template that renders the training prompt (chat_template.py) in the metadata.
- `gguf-lora`: the adapter alone as a GGUF LoRA adapter, applied by the runtime to a base GGUF.
- `ollama`: a folder holding the `gguf` file and a Modelfile whose TEMPLATE renders the training
  prompt in Ollama's Go-template syntax (modelfile.py).

Nothing here imports torch or transformers at import time (the CLI's --help stays instant).
"""

from __future__ import annotations

FORMATS = ("gguf", "gguf-lora", "ollama")
OUTTYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
MODELFILE, OLLAMA_GGUF = "Modelfile", "model.gguf"  # an ollama export: its folder's Modelfile and the GGUF beside it
