"""Runs lora-cli commands in this one process (CliRunner) and prints their exit codes and output as
JSON: test_unwritable_outputs starts it inside a private mount namespace (a read-only and a full
tmpfs) and under a file size limit, which a test cannot set on its own process.

argv[1]: a JSON file {"phases": [{"file_size_limit": bytes or 0, "commands": [[name, [args...]], ...]}]}.
"""

import json
import resource
import sys

from typer.testing import CliRunner

from lora_cli.cli.app import app


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    runner, results = CliRunner(), {}
    for phase in spec["phases"]:
        if phase.get("file_size_limit"):
            limit = phase["file_size_limit"]
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for name, args in phase["commands"]:
            res = runner.invoke(app, args)
            results[name] = {"exit": res.exit_code, "output": res.output}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
