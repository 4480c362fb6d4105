"""`wanstream models`: which model files are present, where, and how big; nothing is downloaded."""

from __future__ import annotations

import argparse
import json
import os
import sys

from wanstream.weights.registry import DEFAULT_PIPELINE, DEFAULT_TEXT_ENCODER, PIPELINES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list model files: present, missing, sizes, locations",
        description=(
            "List the files of a pipeline in the models folder (--models-dir, else WANSTREAM_MODELS_DIR, "
            "else ~/.cache/wanstream/models) and, when WANSTREAM_LORA_DIR is set, the LoRA files there."
        ),
    )
    p.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        choices=sorted(PIPELINES),
        help="which model (default: %(default)s)",
    )
    p.add_argument("--models-dir", metavar="DIR", help="the models folder to inspect")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from wanstream.weights.registry import get_pipeline, human_bytes
    from wanstream.weights.store import (
        ENV_MODELS_DIR,
        Store,
        download_command,
        lora_files,
    )

    store = Store(args.models_dir)
    if store.root.exists() and not store.root.is_dir():
        source = "--models-dir" if args.models_dir else ENV_MODELS_DIR
        print(
            f"error: the models folder {store.root} ({source}) is a file, not a folder: name a folder, or a "
            "path that does not exist yet (the download makes it)",
            file=sys.stderr,
        )
        return 2
    pipeline = get_pipeline(args.pipeline)
    statuses = [store.status(a) for a in pipeline.artifacts]
    required = [s for s in statuses if s.artifact.option is None]
    encoders = [s for s in statuses if s.artifact.role == "text_encoder"]
    missing = [s.artifact for s in required if not s.present]
    if not any(s.present for s in encoders):
        missing += [s.artifact for s in encoders if s.artifact.variant == "bf16"]
    ready = not missing
    command = download_command(missing, store.root, pipeline.name) if missing else None
    lora_dir, loras = lora_files()

    if args.json:
        print(
            json.dumps(
                {
                    "pipeline": pipeline.name,
                    "models_dir": str(store.root),
                    "ready": ready,
                    "download_command": command,
                    "artifacts": [
                        {
                            "key": s.artifact.key,
                            "role": s.artifact.role,
                            "variant": s.artifact.variant,
                            "option": s.artifact.option,
                            "repo_id": s.artifact.repo_id,
                            "repo_path": s.artifact.path,
                            "local_path": str(s.path),
                            "state": s.state,
                            "bytes": s.bytes_present,
                            "partial_bytes": s.partial_bytes,
                            "approx_bytes": s.artifact.approx_bytes,
                        }
                        for s in statuses
                    ],
                    "lora_dir": str(lora_dir) if lora_dir else None,
                    "lora_files": [{"path": str(p), "bytes": p.stat().st_size} for p in loras],
                },
                indent=2,
            )
        )
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or in a log: full lines, never a path folded mid-word
        console = Console(width=10_000)
    origin = (
        "--models-dir" if args.models_dir else ENV_MODELS_DIR if os.environ.get(ENV_MODELS_DIR) else "default"
    )
    console.print(f"Models folder: {store.root}  ({origin})")
    table = Table(title=f"{pipeline.name}: {pipeline.description}", title_justify="left")
    for col, justify in (("file", "left"), ("size", "right"), ("status", "left"), ("download flag", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for s in statuses:
        a = s.artifact
        if s.present:
            size = human_bytes(s.bytes_present)
        else:
            size = f"~{human_bytes(a.approx_bytes)}"
        state = {
            "verified": "[green]verified[/green]",
            "present": "[yellow]present (unverified)[/yellow]",
            "partial": f"[yellow]partial {human_bytes(s.partial_bytes)}[/yellow]",
            "missing": "[red]missing (required)[/red]"
            if a.option is None
            else "[dim]not downloaded (optional)[/dim]",
        }[s.state]
        needed = "(always)" if a.option is None else a.option
        if a.role == "text_encoder" and a.variant == DEFAULT_TEXT_ENCODER:
            needed += " (default)"
        table.add_row(a.local_relpath(), size, state, needed)
    console.print(table)
    console.print(
        "missing (required): the pipeline cannot run without it; not downloaded (optional): fetched only "
        "with its download flag.",
        markup=False,
    )
    total = sum(s.bytes_present for s in statuses)
    console.print(f"{human_bytes(total)} on disk for this pipeline.")
    if ready:
        console.print("[green]Ready:[/green] every required file is present.")
    else:
        console.print("[red]Not ready.[/red] Download the missing files with:", markup=True)
        console.print(f"  {command}", markup=False)
    if lora_dir is not None:
        if not lora_dir.is_dir():
            console.print(f"LoRA folder {lora_dir} (WANSTREAM_LORA_DIR) does not exist.", markup=False)
        else:
            console.print(f"LoRA files in {lora_dir} (WANSTREAM_LORA_DIR): {len(loras)}", markup=False)
            for path in loras:
                rel = path.relative_to(lora_dir).as_posix()
                console.print(f"  {rel}  {human_bytes(path.stat().st_size)}", markup=False)
    return 0
