"""`python -m lora_cli` (and `accelerate launch -m lora_cli`) enter here."""

from lora_cli.cli.app import main

if __name__ == "__main__":
    main()
