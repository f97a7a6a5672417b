"""One module per command; lora_cli.cli.app.COMMANDS names each command's function."""
