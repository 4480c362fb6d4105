"""`wanstream lora add | list | remove`: the LoRA folder as a library (docs/lora.md, "The LoRA library").

    wanstream lora add hf://owner/repo/style.safetensors      # or civitai:123456, or an https:// link
    wanstream lora list
    wanstream lora remove style.safetensors

The folder is --lora-dir, else WANSTREAM_LORA_DIR (the folder `generate --lora NAME` and `serve` read).
Exit codes: 0 done, 2 bad input (a bad link or name, a file that does not fit the model), 1 a failed download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lora",
        help="add LoRAs from Hugging Face / CivitAI / https links, list and remove them",
        description=(
            "Manage the LoRA folder (--lora-dir, else WANSTREAM_LORA_DIR). `add` downloads a LoRA (resumable, "
            "size- and hash-checked), refuses a file that does not fit Wan2.1-T2V-1.3B, and records where it "
            "came from next to it."
        ),
    )
    p.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="the LoRA folder (default: $WANSTREAM_LORA_DIR)"
    )
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION", help="add, list or remove a LoRA")
    add = sub.add_parser("add", help="download a LoRA into the folder")
    add.add_argument(
        "source",
        help="hf://owner/repo/path/file.safetensors[@revision], civitai:MODEL_VERSION_ID, or an https:// link "
        "(CIVITAI_TOKEN and HF_TOKEN are used when set)",
    )
    add.add_argument("--name", help="the file name to keep it under (default: the source's file name)")
    add.set_defaults(handler=run_add)
    ls = sub.add_parser("list", help="the LoRAs in the folder, with where they came from")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=run_list)
    rm = sub.add_parser("remove", help="delete a LoRA (and its provenance record) from the folder")
    rm.add_argument("name", help="its name in the folder, as `wanstream lora list` shows it")
    rm.set_defaults(handler=run_remove)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def _library(args: argparse.Namespace):  # -> LoraLibrary | None
    from wanstream.weights.lora_library import LoraLibrary
    from wanstream.weights.store import ENV_LORA_DIR

    folder = args.lora_dir or (Path(os.environ[ENV_LORA_DIR]) if os.environ.get(ENV_LORA_DIR) else None)
    if folder is None:
        print(f"error: no LoRA folder: give --lora-dir DIR or set {ENV_LORA_DIR}", file=sys.stderr)
        return None
    return LoraLibrary(folder)


def run_add(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from wanstream.weights.download import DownloadError
    from wanstream.weights.lora_library import LoraLibraryError

    library = _library(args)
    if library is None:
        return 2
    err = Console(stderr=True, highlight=False)
    columns = (
        TextColumn("downloading"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
    )
    try:
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("lora", total=None)
            record = library.add(
                args.source,
                name=args.name,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except LoraLibraryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"added {record.name} to {library.root}")
    _describe(record.to_dict())
    return 0


def run_list(args: argparse.Namespace) -> int:
    library = _library(args)
    if library is None:
        return 2
    entries = library.entries()
    if args.json:
        print(json.dumps({"lora_dir": str(library.root), "loras": entries}, indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print(f"no LoRAs in {library.root} (add one with `wanstream lora add LINK`)")
        return 0
    print(f"LoRAs in {library.root}:")
    for entry in entries:
        print(f"  {entry['name']}  ({entry['bytes'] / 1e6:.1f} MB)")
        if entry["provenance"]:
            _describe(entry["provenance"], indent="    ")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from wanstream.weights.lora_library import LoraLibraryError

    library = _library(args)
    if library is None:
        return 2
    try:
        library.remove(args.name)
    except LoraLibraryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"removed {args.name} from {library.root}")
    return 0


def _describe(p: dict, indent: str = "  ") -> None:
    print(f"{indent}from {p.get('source')}, added {p.get('added')}")
    print(f"{indent}sha256 {p.get('sha256')} (checked against: {p.get('verified_against')})")
    print(f"{indent}{p.get('layers')} layers, rank {'/'.join(map(str, p.get('ranks') or []))}")
    if p.get("trigger_words"):
        print(f"{indent}trigger words: {', '.join(p['trigger_words'])}")
    if p.get("tags"):
        print(f"{indent}training tags: {', '.join(p['tags'])}")
