"""Using an adapter: loading base + adapter, generation, evaluation.

Imports the adapter, data and model layers.
"""
