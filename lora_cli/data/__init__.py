"""Instruction data: reading and validating records, templates, tokenization, the cache, micro-batches.

Imports the model layer (tokenizers) and the foundation modules only.
"""
