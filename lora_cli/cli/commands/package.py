"""`lora-cli package`: the adapter folder zipped with a manifest; `--verify` checks a zip."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer


def _summary_line(folder: Path) -> str:
    """One line of the folder's parameter summary (param-report shows the per-module table)."""
    from lora_cli.adapter.folder import PARAM_SUMMARY, read_param_summary

    summary = read_param_summary(folder)
    if summary is None:
        return f"(no {PARAM_SUMMARY} in the adapter folder)"
    lora = f"; LoRA r={summary.lora.r}, alpha={summary.lora.alpha}" if summary.lora else ""
    base = f"{summary.base_model}{lora}: " if summary.base_model else ""
    return (f"{base}{summary.trainable:,} trainable of {summary.total:,} parameters ({summary.percent:.4f}%); "
            f"per module: lora-cli param-report {folder}")


def package(
    target: Annotated[Path, typer.Argument(help="Adapter folder to zip (or, with --verify, a zip to check).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Zip to write. [default: adaptermodel.zip]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing zip.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check a zip against its manifest (exit 1 if not intact).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest or check result as JSON.")] = False,
) -> None:
    """Zip the adapter folder (without checkpoints) with MANIFEST.json; print its parameter counts and the zip's path."""
    from lora_cli.adapter import packaging
    from lora_cli.cli.render import out

    if verify:
        result = packaging.verify(target)
        if as_json:
            typer.echo(json.dumps({k: v for k, v in asdict(result).items() if k != "manifest"}, indent=2))
        else:
            for label, names in (("changed", result.changed), ("missing", result.missing), ("extra", result.extra),
                                 ("unsafe path", result.unsafe)):
                for name in names:
                    out.print(f"[red]{label}[/]: {name}", markup=True)
            n = len(result.manifest.get("files", {}))
            if result.config_mismatch:
                out.print(f"{target}: {result.config_mismatch}.", markup=False, soft_wrap=True)
            matches = not (result.changed or result.missing or result.extra or result.unsafe)
            verdict = (f"[green]intact[/] ({n} files match the manifest)" if result.ok
                       else "[red]does not match its manifest[/]" if not matches
                       else f"[red]not a usable adapter[/] ({n} files match the manifest, but its config and "
                            "weights disagree)")
            out.print(f"{target}: {verdict}", markup=True)
        raise typer.Exit(0 if result.ok else 1)
    dest = output or Path("adaptermodel.zip")
    manifest = packaging.package(target, dest, force)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    total = sum(f["size"] for f in manifest["files"].values())
    out.print(_summary_line(Path(target)), markup=False, soft_wrap=True)
    out.print(f"Wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB): {len(manifest['files'])} files "
              f"({total / 1e6:.1f} MB before compression) + {packaging.MANIFEST}", markup=False, soft_wrap=True)
