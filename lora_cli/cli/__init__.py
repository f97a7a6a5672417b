"""The command line: the Typer app, its flags, rendering, and one module per command.

Imports every layer below; nothing imports it.
"""
