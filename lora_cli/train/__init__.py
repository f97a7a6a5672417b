"""Training: the recipe, the loop, its runtime decisions, checkpoints, several processes.

Imports every layer below it (infer, adapter, data, model).
"""
