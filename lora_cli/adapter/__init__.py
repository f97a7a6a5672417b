"""The adapter folder: what it holds, packaging it as a zip, merging it into its base.

Imports the data and model layers.
"""
