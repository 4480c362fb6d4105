"""`wanstream download`: fetch a pipeline's weights from the Hugging Face Hub.

The only command that downloads anything. Resumable, verified, atomic and idempotent; see
`wanstream.weights.download` and docs/weights.md.
"""

from __future__ import annotations

import argparse
import sys

from wanstream.weights.registry import (
    DEFAULT_PIPELINE,
    DEFAULT_TEXT_ENCODER,
    PIPELINES,
    TEXT_ENCODERS,
    Selection,
)


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
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, choices=sorted(PIPELINES))
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
    p.add_argument("--dry-run", action="store_true", help="list what would be downloaded, then stop")
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
    try:
        download(
            selection, models_dir=args.models_dir, console=Console(), dry_run=args.dry_run, verify=args.verify
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Partial downloads are kept; run the same command again to resume.", file=sys.stderr)
        raise
    return 0
