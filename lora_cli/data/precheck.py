"""Bad records refused before torch loads: a data error costs a second, not a model load.

`train` and `tokenize` read every record of their files here, with the parser tokenizing uses,
before they import torch and transformers (~10 s). A file with an invalid record is refused with
the same message tokenizing would give. Files above PRECHECK_BYTES are left to tokenizing, which
checks every record anyway: reading them twice would cost more than it saves.
"""

from __future__ import annotations

from pathlib import Path

from lora_cli.config import RunConfig
from lora_cli.data.records import Issue, error_lines, iter_examples
from lora_cli.errors import DataError

PRECHECK_BYTES = 64 << 20  # 64 MiB: under a second of parsing, paid again by every run of that file


def refuse_invalid_records(cfg: RunConfig) -> None:
    """Raise DataError naming every invalid record of the run's train and val files (file, line,
    field), unless --skip-invalid leaves them out. Reads only; changes nothing."""
    if cfg.data.skip_invalid:
        return
    for path in [Path(name) for name in (cfg.data.train, cfg.data.val) if name]:
        if not path.is_file() or path.stat().st_size > PRECHECK_BYTES:
            continue  # a missing file is the resolver's to name; a huge one tokenizing checks
        errors: list[Issue] = []
        for _ in iter_examples(path, on_issue=lambda i: errors.append(i) if i.severity == "error" else None):
            pass
        if errors:
            raise DataError(f"{path} has {len(error_lines(errors))} invalid line(s); nothing was tokenized.", errors,
                            hint="Fix them (lora-cli validate-data lists every one) or pass --skip-invalid.")
