"""lora-cli: QLoRA fine-tuning of causal language models from instruction data.

Kept import-free on purpose: `lora-cli --help` must not pay for torch or transformers.
"""

__version__ = "0.1.0"
