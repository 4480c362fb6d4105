"""`wanstream serve`: the real-time WebRTC server (studio, REST and WebSocket control, metrics)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wanstream.server.config import ServerConfig

TOKEN_ENV = "WANSTREAM_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the real-time server (WebRTC in/out, live control, studio)",
        description=(
            "Serve real-time video diffusion over WebRTC: a client sends a camera or file stream (or nothing, "
            "in text mode) and gets the generated stream back, with live prompt/seed/steps/noise control over "
            "a data channel, REST (/docs) or a WebSocket. Binds to 127.0.0.1 unless told otherwise; any other "
            f"address needs a token (--token or ${TOKEN_ENV})."
        ),
    )
    _model_flags(p.add_argument_group("model", "which weights, and where they run"))
    _network_flags(p.add_argument_group("network and access", "who may connect, and how"))
    _osc_flags(p.add_argument_group("OSC control", "docs/control.md"))
    _session_flags(p.add_argument_group("streams and limits", "what each stream may use"))
    _rig_flags(p.add_argument_group("live rig", "server-side inputs and outputs (docs/live-rig.md)"))
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much the server logs (default: %(default)s)",
    )
    from wanstream.cli.extend_cmd import add_extender_flags

    add_extender_flags(p)  # for POST /api/v1/prompts/extend and the studio's Extend buttons
    p.set_defaults(handler=run)


def _model_flags(g: argparse._ArgumentGroup) -> None:
    """The model: demo, random or downloaded weights, memory choices, device(s)."""
    from wanstream.cli.bench_cmd import add_memory_flags

    g.add_argument("--demo", action="store_true", help="tiny random-weight model: no download, runs on a CPU")
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="full-size networks with RANDOM weights (no download): the real model's work and memory, noise "
        "for output — for measuring the live path on a GPU (labelled as such everywhere)",
    )
    g.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="downloaded weights (see `wanstream models`)"
    )
    add_memory_flags(g)  # --text-encoder, --precision, --low-vram (docs/memory.md)
    g.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: CUDA when available)")
    g.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="one stream over GPUs 0..N-1 (pipeline parallel, docs/multigpu.md; needs --max-sessions 1); "
        "with --device cpu, N CPU processes",
    )
    g.add_argument(
        "--no-vace",
        action="store_true",
        help="do not load the VACE module even when it is downloaded (saves ~1.5 GB of GPU memory)",
    )
    g.add_argument("--no-preload", action="store_true", help="load the model on POST /api/v1/model/load only")
    g.add_argument(
        "--no-warm-up",
        action="store_true",
        help="on a GPU, skip the private first stream run while the model loads (it compiles what streams at "
        "the default settings need, so the first client's stream starts at once; without it that stream "
        "waits for the compiles: about a minute with an empty compile cache)",
    )


def _network_flags(g: argparse._ArgumentGroup) -> None:
    """Binding, access and WebRTC connectivity."""
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    g.add_argument("--token", help=f"access token required on every request (or ${TOKEN_ENV})")
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="URL",
        help="allow this browser origin (repeatable)",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="close connections whose request headers are not complete within this (10)",
    )
    g.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="STUN/TURN URL for clients beyond the LAN",
    )
    g.add_argument(
        "--ice-timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="tear down peers not connected by then (20)",
    )
    g.add_argument(
        "--ice-allow-link-local",
        action="store_true",
        help="accept trickled ICE candidates with link-local addresses (169.254/16, fe80::/10; refused by "
        "default: cloud metadata services live there)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {port}")
    return port


def _osc_flags(g: argparse._ArgumentGroup) -> None:
    """OSC control over UDP."""
    g.add_argument(
        "--osc-port",
        type=_port,
        metavar="N",
        help="OSC control on this UDP port (default: the HTTP port's number; docs/control.md)",
    )
    g.add_argument("--no-osc", action="store_true", help="no OSC control")
    g.add_argument(
        "--osc-allow",
        action="append",
        default=[],
        metavar="ADDR",
        help="with a non-loopback --host: OSC senders at this IP address need no token (repeatable; others "
        "send the token as each message's first argument)",
    )


def _session_flags(g: argparse._ArgumentGroup) -> None:
    """Per-stream defaults and the limits every client is held to."""
    g.add_argument(
        "--max-sessions",
        type=int,
        default=1,
        metavar="N",
        help="concurrent streams (default: 1, one GPU session)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="stop a headless session after this long without a request about it (300)",
    )
    g.add_argument(
        "--max-chunk-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="refuse streams whose chunks would take longer than this on this device (5; not real time)",
    )
    g.add_argument("--height", type=int, help="default output height for new streams (multiple of 16)")
    g.add_argument("--width", type=int, help="default output width for new streams (multiple of 16)")
    g.add_argument(
        "--media-dir", type=Path, metavar="DIR", help="server-side videos for headless sessions/uploads"
    )
    g.add_argument(
        "--recordings-dir", type=Path, metavar="DIR", help="keep recordings here (default: temporary)"
    )
    g.add_argument(
        "--take-log-mib",
        type=int,
        default=4096,
        metavar="MIB",
        help="each stream keeps a session log for bit-exact replay (docs/replay.md), its frames up to this "
        "size (lossless, ~1 MiB a 480x832 frame of camera video); 0: no logs (default: %(default)s)",
    )
    g.add_argument(
        "--reproducible-takes",
        action="store_true",
        help="on a GPU, cuDNN picks convolution algorithms by heuristics and Inductor's kernels take their "
        "first launch configuration, instead of timing them in this process: the same in every process "
        "(slower: cuDNN's heuristics cost 13 ms a chunk at 480x832 on an H100). The measured causes of a take "
        "replaying otherwise in another process; that it then replays bit for bit is not yet confirmed on a "
        "GPU (docs/replay.md)",
    )
    g.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="LoRA files clients may apply by name (default: $WANSTREAM_LORA_DIR; none when unset)",
    )
    g.add_argument(
        "--max-upload-mb", type=int, default=512, metavar="MB", help="upload size limit in MiB (default: 512)"
    )


def _rig_flags(g: argparse._ArgumentGroup) -> None:
    """Server-side sinks and the NDI input."""
    g.add_argument(
        "--sink",
        action="append",
        default=[],
        metavar="KIND[:NAME]",
        help="send every new session's output here too (repeatable): 'ts' (MPEG-TS at "
        "/api/v1/sessions/ID/output.ts), 'ndi:NAME' (an NDI source), 'virtualcam[:DEVICE]', 'spout:NAME' "
        "(Windows), 'syphon:NAME' (macOS); a session that names its own sinks gets those instead",
    )
    g.add_argument(
        "--ndi-in",
        metavar="SOURCE",
        help="restyle this NDI source from start-up, without a browser: its name as NDI lists it "
        "('HOST (STREAM)') or its address HOST:PORT; combine with --sink",
    )
    g.add_argument(
        "--no-ndi-discovery",
        action="store_true",
        help="NDI by direct address (HOST:PORT) only: no mDNS announcements or browsing",
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from wanstream.cli.bench_cmd import low_vram_choices
    from wanstream.engine.settings import SettingsUpdate
    from wanstream.server.config import MiB, ServerConfig
    from wanstream.server.security import SecurityError, check_bind
    from wanstream.weights.store import ENV_LORA_DIR

    # The engine thread shares the GIL with the event loop, aiortc's threads and the frame converter; at
    # Python's default 5 ms switch interval each hand-back can stall it that long, a few times per chunk.
    sys.setswitchinterval(0.0005)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        check_bind(args.host, token)  # before anything slow: an unsafe bind fails at once
    except SecurityError as exc:
        print(f"wanstream serve: {exc}", file=sys.stderr)
        return 2
    problem = _gpus_problem(args)
    if problem:
        print(f"wanstream serve: {problem}", file=sys.stderr)
        return 2
    if args.random_weights and (args.demo or args.gpus != 1):
        print(
            "wanstream serve: --random-weights runs the full-size networks on one device: drop --demo/--gpus"
        )
        return 2
    overrides = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    if args.low_vram:  # the profile's codecs for new streams (a client may still ask for others)
        from wanstream.pipeline import LOW_VRAM_SETTINGS

        overrides = {**LOW_VRAM_SETTINGS, **overrides}
    try:
        SettingsUpdate.model_validate(overrides)
    except ValidationError as exc:
        print(f"wanstream serve: {exc}", file=sys.stderr)
        return 2
    env_lora_dir = os.environ.get(ENV_LORA_DIR)
    lora_dir = args.lora_dir or (Path(env_lora_dir) if env_lora_dir else None)
    lora_flag = "--lora-dir" if args.lora_dir else ENV_LORA_DIR
    folders = ((args.media_dir, "--media-dir"), (args.models_dir, "--models-dir"), (lora_dir, lora_flag))
    for folder, flag in folders:
        if folder is not None and not folder.is_dir():
            print(f"wanstream serve: {flag} {folder} is not a folder", file=sys.stderr)
            return 2
    if args.take_log_mib < 0:
        print(
            f"wanstream serve: --take-log-mib must be 0 (no logs) or more, got {args.take_log_mib}",
            file=sys.stderr,
        )
        return 2
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=token,
        max_sessions=args.max_sessions,
        demo=args.demo,
        random_weights=args.random_weights,
        **low_vram_choices(args),
        models_dir=args.models_dir,
        vace=not args.no_vace,
        device=args.device,
        gpus=args.gpus,
        preload=not args.no_preload,
        warm_up=not args.no_warm_up,
        media_dir=args.media_dir,
        lora_dir=lora_dir.expanduser() if lora_dir is not None else None,
        recordings_dir=args.recordings_dir,
        take_log_mib=args.take_log_mib,
        reproducible_takes=args.reproducible_takes,
        cors_origins=tuple(args.cors_origin),
        ice_servers=tuple(args.ice_server),
        max_upload_bytes=args.max_upload_mb * MiB,
        ice_timeout_s=args.ice_timeout,
        headless_idle_s=args.idle_timeout,
        max_chunk_s=args.max_chunk_seconds,
        ice_allow_link_local=args.ice_allow_link_local,
        osc=not args.no_osc,
        osc_port=args.osc_port,
        osc_allow=tuple(args.osc_allow),
        settings_overrides=overrides,
        sinks=tuple(args.sink),
        ndi_in=args.ndi_in,
        ndi_discovery=not args.no_ndi_discovery,
    )
    problem = _io_problem(config)
    if problem:
        print(f"wanstream serve: {problem}", file=sys.stderr)
        return 2

    from wanstream.server.app import create_app
    from wanstream.server.http import ListenError, listen, serve
    from wanstream.server.prompts_api import default_factory

    try:  # before anything loads: a port in use is an error now, not after the weights
        sock = listen(args.host, args.port)
    except ListenError as exc:
        print(f"wanstream serve: {exc.strerror}", file=sys.stderr)
        return 2
    extender = default_factory(
        config.models_dir,
        config.demo,
        url=args.extender_url,
        model=args.extender_model,
        device=args.extender_device,
        timeout_s=args.extender_timeout,
    )
    try:
        app = create_app(config, extender=extender)
    except (SecurityError, ValueError) as exc:
        sock.close()
        print(f"wanstream serve: {exc}", file=sys.stderr)
        return 2
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if args.random_weights:  # the first line says it, as for the demo
        from wanstream.pipeline import RANDOM_LABEL

        print(f"wanstream serve: {RANDOM_LABEL}", file=sys.stderr)
    elif args.demo:  # the first line says it: everything streamed is the random-weight model's
        from wanstream.engine.random_weights import DEMO_LABEL

        print(f"wanstream serve: {DEMO_LABEL}", file=sys.stderr)
    print(
        f"wanstream serve: http://{shown}:{args.port}  (API docs: /docs, metrics: /metrics)", file=sys.stderr
    )
    return serve(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        header_timeout_s=args.header_timeout,
        sock=sock,
    )


def _io_problem(config: ServerConfig) -> str | None:
    """Why a --sink / --ndi-in cannot work on this machine (a missing package, device or OS), or None."""
    from wanstream.server.io.autostart import check_io
    from wanstream.server.io.hardware import io_availability
    from wanstream.server.io.specs import SinkSpec

    try:
        check_io(config)
    except ValueError as exc:
        return str(exc)
    wanted = [(f"--sink {text}", SinkSpec.parse(text).kind) for text in config.sinks]
    if config.ndi_in:
        wanted.append((f"--ndi-in {config.ndi_in}", "ndi"))
    available = io_availability() if wanted else {}
    for flag, kind in wanted:
        if not available[kind]["available"]:
            return f"{flag}: {available[kind]['reason']}"
    return None


def _gpus_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --gpus, in words (None: fine)."""
    if args.gpus < 1:
        return f"--gpus {args.gpus}: give a number of GPUs, 1 or more"
    if args.gpus == 1:
        return None
    if args.max_sessions != 1:
        return f"--gpus {args.gpus} runs one stream over the GPUs: use --max-sessions 1"
    import torch

    if args.device != "cpu" and torch.cuda.device_count() < args.gpus:
        return (
            f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use fewer, "
            "or --device cpu to run the multi-GPU path on CPU processes"
        )
    return None
