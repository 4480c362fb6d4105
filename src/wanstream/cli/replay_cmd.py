"""`wanstream replay TAKE.wslog -o out.mp4`: a live take run again offline, checked frame by frame.

Exit codes: 0 replayed (bit for bit, or with the differences the report names), 1 frames differ although
model, dtype and device kind are the same (a bug: please report it), 2 bad input (an unreadable log, a log
that cannot be replayed, a bad output path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay",
        help="replay a session log (.wslog) offline, bit for bit, into an MP4",
        description=(
            "Run a live take again from its session log (saved by the studio's Save take, GET "
            "/api/v1/sessions/ID/log or session.log()): the same input frames and the same changes at the same "
            "chunks. On the same device kind, dtype and model files every frame equals the live one, checked "
            "against the digests the live stream recorded; elsewhere it runs and says what differs (docs/replay.md)."
        ),
    )
    p.add_argument("log", type=Path, help="the session log (.wslog)")
    p.add_argument("-o", "--output", type=Path, help="write the replayed take as an H.264 MP4")
    p.add_argument("--fps", type=float, help="the MP4's frame rate (default: the take's, from its timing)")
    p.add_argument("--models-dir", metavar="DIR", help="where the model files are (see `wanstream models`)")
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="where the take's LoRA files are, by name")
    p.add_argument("--device", help="cuda or cpu (default: the take's kind when available)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    p.add_argument(
        "--timeline",
        type=Path,
        metavar="FILE",
        help="write the take's prompt changes as a Scope timeline v2.1 (for Scope; alone, nothing is replayed)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wanstream.media.video import VideoError, VideoWriter
    from wanstream.takes import LogError, load_log, replay
    from wanstream.takes.model import pipeline_for

    err = Console(stderr=True)
    try:
        log = load_log(args.log)
    except LogError as exc:
        print(f"wanstream replay: {exc}", file=sys.stderr)
        return 2
    with log:
        if log.header.get("unreplayable"):
            print(
                f"wanstream replay: this log cannot be replayed: {log.header['unreplayable']}",
                file=sys.stderr,
            )
            return 2
        if args.timeline is not None:
            from wanstream.takes.timeline import timeline_of

            try:
                timeline_of(log).save(args.timeline)
            except (ValueError, OSError) as exc:
                print(f"wanstream replay: {args.timeline}: {exc}", file=sys.stderr)
                return 2
            err.print(f"wrote the take's prompts as a Scope timeline: {args.timeline}")
            if args.output is None and args.json is None:
                return 0
        fps = args.fps or log.fps
        writer = None
        if args.output is not None:
            try:
                writer = VideoWriter(args.output, fps=fps)
            except (VideoError, ValueError) as exc:
                print(f"wanstream replay: {exc}", file=sys.stderr)
                return 2
        err.print(f"loading the take's model: {log.model.get('label', '?')}")
        pipe = pipeline_for(log.model, models_dir=args.models_dir, device=args.device, lora_dir=args.lora_dir)
        with Progress(
            TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
        ) as bar:
            task = bar.add_task("calls", total=len(log.ops))
            try:
                report = replay(
                    log,
                    pipe.components,
                    on_frames=(lambda _i, frames: writer.write(torch.from_numpy(frames)))
                    if writer is not None
                    else None,
                    progress=lambda done, _total: bar.update(task, completed=done),
                )
            except LogError as exc:
                if writer is not None:
                    writer.abort()
                print(f"wanstream replay: {exc}", file=sys.stderr)
                return 2
        if writer is not None:
            writer.close()
            err.print(f"wrote {args.output} ({writer.frames_written} frames at {fps:g} FPS)")
    err.print(report.summary())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    mismatch = report.compared and not report.bit_exact and not report.differences
    return 1 if mismatch else 0
