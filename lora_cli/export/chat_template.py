"""The training prompt as a Jinja chat template: moved to lora_cli.data.chat_template (merge writes it
into a merged folder too, and merge sits below export); this name stays for code that imports it here."""

from lora_cli.data.chat_template import *  # noqa: F401,F403
