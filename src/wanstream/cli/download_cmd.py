"""`wanstream download`: fetch a pipeline's weights from the Hugging Face Hub.

The only command that downloads anything. Resumable, verified, atomic and idempotent; see
`wanstream.weights.download` and docs/weights.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from wanstream.weights.registry import (
    DEFAULT_PIPELINE,
    DEFAULT_TEXT_ENCODER,
    PIPELINES,
    TEXT_ENCODERS,
    Selection,
)

if TYPE_CHECKING:
    from rich.console import Console


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download",
        help="download model weights from the Hugging Face Hub",
        description=(
            "Download the weights a pipeline needs into the models folder (--models-dir, else "
            "WANSTREAM_MODELS_DIR, else ~/.cache/wanstream/models). Interrupted downloads resume; "
            "files are verified against the hub's hashes before they are installed; files already "
            "present and verified are not downloaded again. HF_TOKEN, HF_ENDPOINT and "
            "HF_HUB_OFFLINE are respected."
        ),
    )
    p.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        choices=sorted(PIPELINES),
        help="which model's files (default: %(default)s; `wanstream models --pipeline NAME` lists them)",
    )
    p.add_argument("--models-dir", metavar="DIR", help="where model files go")
    p.add_argument(
        "--text-encoder",
        choices=TEXT_ENCODERS,
        default=DEFAULT_TEXT_ENCODER,
        help="umT5-XXL weights: official bf16 (11.4 GB) or the float8 repack (6.7 GB) "
        f"(default: {DEFAULT_TEXT_ENCODER})",
    )
    p.add_argument("--with-taehv", action="store_true", help="also the TAEHV tiny autoencoder (23 MB)")
    p.add_argument("--with-14b", action="store_true", help="also the 14B generator and its config")
    p.add_argument("--with-vace", action="store_true", help="also the 1.3B VACE module")
    p.add_argument(
        "--with-prompt-extender",
        action="store_true",
        help="also Qwen2.5-1.5B-Instruct for `wanstream extend` / --extend-prompts (3.1 GB, docs/prompts.md)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be downloaded (from the registry of known files: no network needed), then stop",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash files already present and re-download any that differ from the hub",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from wanstream.weights.download import DownloadError, download

    selection = Selection(
        pipeline=args.pipeline,
        text_encoder=args.text_encoder,
        taehv=args.with_taehv,
        with_14b=args.with_14b,
        vace=args.with_vace,
        prompt_extender=args.with_prompt_extender,
    )
    if args.dry_run:
        _dry_run(Console(), selection, args.models_dir)
        return 0
    try:
        download(selection, models_dir=args.models_dir, console=Console(), verify=args.verify)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Partial downloads are kept; run the same command again to resume.", file=sys.stderr)
        raise
    return 0


def _dry_run(console: Console, selection: Selection, models_dir: str | None) -> None:
    """What a download would do, from the registry and the files on disk alone (the hub is not asked, so
    it works offline): sizes on disk are exact, sizes still to fetch are the registry's estimates."""
    from wanstream.weights.registry import human_bytes
    from wanstream.weights.store import Store

    store = Store(models_dir)
    console.print(f"Dry run: nothing is downloaded and the hub is not contacted. Models folder: {store.root}")
    to_fetch = 0
    for status in store.statuses(selection):
        a = status.artifact
        if status.state == "verified":
            size, action = human_bytes(status.bytes_present), "present and verified: skipped"
        elif status.state == "present":
            size = human_bytes(status.bytes_present)
            action = "present, not verified yet: hashed against the hub, fetched again only if it differs"
        else:
            size = f"~{human_bytes(a.approx_bytes)} (estimate)"
            to_fetch += a.approx_bytes - status.partial_bytes
            action = (
                f"partial ({human_bytes(status.partial_bytes)} so far): resumed"
                if status.state == "partial"
                else "to download"
            )
        console.print(
            f"  {a.local_relpath()}  {size}  from {a.repo_id}: {action}", markup=False, soft_wrap=True
        )
    if to_fetch:
        console.print(
            f"About {human_bytes(to_fetch)} to download (exact sizes come from the hub when it runs)."
        )
    else:
        console.print("Nothing to download: every file is present.")
