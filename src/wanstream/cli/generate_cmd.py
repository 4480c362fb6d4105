"""`wanstream generate`: an input video (or the built-in clip, or text alone) and prompts → an MP4.

A thin layer over `wanstream.jobs.generate`: parse flags into a `GenerateRequest`, validate it (`plan`) before
any model loads, load the real model (or, with --demo and no weights, the tiny random one), run it with a
progress bar and print the summary. Exit codes: 0 done, 2 bad input, 1 runtime failure (missing weights
included), 130 Ctrl-C (the frames generated so far are kept as a valid MP4).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from rich.markup import escape

if TYPE_CHECKING:
    from rich.console import Console

    from wanstream.jobs.generate import GeneratePlan, GenerateProgress, GenerateResult


def register(subparsers: argparse._SubParsersAction) -> None:
    from wanstream.engine.settings import Codec, LoraMode, Mode
    from wanstream.jobs.generate.request import JobBatching

    p = subparsers.add_parser(
        "generate",
        help="restyle a video file (or make one from text) with a prompt or a Scope timeline",
        description=(
            "Offline video-to-video (or text-to-video) generation. Without INPUT_VIDEO it restyles the built-in "
            "sample clip. Prompts come from a Scope timeline (v2.0/v2.1 export or workflow) or --prompt; a "
            "timeline's settings apply unless given here. The output follows the input's resolution (rounded to "
            "a multiple of 16) and frame rate, one output frame per input frame. See docs/generate.md."
        ),
    )
    p.add_argument(
        "input", nargs="?", type=Path, metavar="INPUT_VIDEO", help="video to restyle (any common format)"
    )
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--timeline", type=Path, metavar="FILE", help="Scope timeline or workflow JSON")
    prompts.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT[:WEIGHT]",
        help="prompt; repeat for a weighted blend, e.g. --prompt 'a cat:2' --prompt 'a tiger:1'",
    )
    p.add_argument(
        "-o", "--output", type=Path, default=Path("output.mp4"), help="MP4 to write (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, help="random seed (same seed + input + prompts = same video)")
    p.add_argument("--steps", metavar="T1,T2,…", help="descending denoising timesteps, e.g. 700,500")
    p.add_argument("--noise-scale", type=float, metavar="S", help="how much of the input becomes noise (0-1)")
    p.add_argument(
        "--noise-controller",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lower the noise when the input moves fast (default: on, or the timeline's setting)",
    )
    p.add_argument(
        "--vae",
        choices=get_args(Codec),
        help="encoder and decoder: the Wan VAE (default), or TAEHV (fast; needs `wanstream download "
        "--with-taehv`); the demo model defaults to TAEHV",
    )
    from wanstream.cli.bench_cmd import add_memory_flags

    add_memory_flags(p)  # --text-encoder, --precision, --low-vram (docs/memory.md)
    p.add_argument("--width", type=int, metavar="W", help="output width (a multiple of 16)")
    p.add_argument("--height", type=int, metavar="H", help="output height (a multiple of 16)")
    p.add_argument(
        "--batching",
        choices=get_args(JobBatching),
        default="auto",
        help="stream batch (steps as lanes: fastest) or none; auto: stream unless there is one step",
    )
    p.add_argument("--mode", choices=get_args(Mode), help="video (restyle input) or text (prompts alone)")
    p.add_argument(
        "--frames",
        type=int,
        metavar="N",
        help="length in text mode and for the built-in clip; at most N frames of an input video",
    )
    p.add_argument(
        "--fps",
        type=float,
        metavar="F",
        help="output frame rate (an input video is resampled to it by timestamps)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="without downloaded weights, run the tiny RANDOM-WEIGHT model (the whole pipeline, no download)",
    )
    p.add_argument("--stats-json", type=Path, metavar="FILE", help="also write the run's statistics as JSON")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="apply a Wan2.1-1.3B LoRA (a path, or a name in WANSTREAM_LORA_DIR) at SCALE (-10..10, default 1); "
        "repeat for several (docs/lora.md)",
    )
    p.add_argument(
        "--lora-mode",
        choices=get_args(LoraMode),
        help="merged: folded into the weights, no per-frame cost (default); runtime: adapters in the forward",
    )
    _add_vace_flags(p)
    _add_extend_flags(p)
    p.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: CUDA when available)")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="split the DiT over GPUs 0..N-1 (pipeline parallel, docs/multigpu.md); with --device cpu, N CPU "
        "processes (a test of the multi-GPU path)",
    )
    p.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="downloaded weights (see `wanstream models`)"
    )
    p.set_defaults(handler=run)


def _add_vace_flags(p: argparse.ArgumentParser) -> None:
    vace = p.add_argument_group(
        "VACE (control video, masks, reference images; needs `wanstream download --with-vace`, see docs/vace.md)"
    )
    vace.add_argument(
        "--control-video",
        type=Path,
        metavar="FILE",
        help="control video (depth, pose, edges, or frames to inpaint); without INPUT_VIDEO it drives text mode",
    )
    vace.add_argument(
        "--mask-video",
        type=Path,
        metavar="FILE",
        help="masks for the control video, same size and length: white = generate, black = keep",
    )
    vace.add_argument(
        "--ref-image",
        type=Path,
        action="append",
        metavar="FILE",
        help="reference image (subject / style); repeat for up to 4",
    )
    vace.add_argument(
        "--ref-once",
        action="store_true",
        help="references condition the first chunk only (Scope's behaviour) instead of every chunk",
    )
    vace.add_argument("--first-frame", type=Path, metavar="FILE", help="the video starts from this image")
    vace.add_argument("--last-frame", type=Path, metavar="FILE", help="the video ends on this image")
    vace.add_argument(
        "--vace-scale",
        type=float,
        metavar="S",
        help="VACE strength, vace_context_scale in [0, 2] (default 1)",
    )
    vace.add_argument(
        "--vace-corrected",
        action="store_true",
        help="corrected numerics instead of Scope's quirks (then --vace-scale 0 equals a run without VACE)",
    )


def _add_extend_flags(p: argparse.ArgumentParser) -> None:
    from wanstream.cli.extend_cmd import add_extender_flags

    p.add_argument(
        "--extend-prompts",
        action="store_true",
        help="extend every prompt (each timeline segment's) into a detailed paragraph first, once, with the "
        "run's seed; cached, and written into --stats-json (docs/prompts.md)",
    )
    add_extender_flags(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from wanstream.cli.parsers import parse_device
    from wanstream.jobs.generate import GenerateError
    from wanstream.timeline import TimelineError

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    if args.low_vram and args.vae is None:
        args.vae = "taehv"  # the profile's codecs
    try:
        request = _request(args)
        device = parse_device(args.device)
        _check_gpus(args, device)
        missing, missing_part = _missing_weights(args)
        use_demo = missing is not None and args.demo
        job = _plan(request, use_demo)
    except (GenerateError, TimelineError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(_plain(exc))}")
        return 2
    if missing_part is not None:
        roles = {a.role for a in missing_part.missing}
        needs = [text for role, text in _OPTIONAL_PARTS.items() if role in roles]
        err.print(f"[red]error:[/] {' and '.join(needs)}.\n{escape(str(missing_part))}")
        return 1
    if missing is not None and not use_demo:
        err.print(f"[red]error:[/] the model weights are not downloaded.\n{escape(str(missing))}")
        err.print("Or run the whole pipeline on a tiny RANDOM-WEIGHT model (no download): add --demo")
        return 1
    if use_demo:
        err.print(
            f"[yellow]The real model's weights are not downloaded[/] (get them with: {escape(missing.command)}).\n"
            "[bold yellow]Running the DEMO model instead: tiny, RANDOM WEIGHTS — the output is coloured noise "
            "shaped by the input, not StreamDiffusionV2.[/]"
        )
    if args.extend_prompts:
        try:
            job = _extend_prompts(err, args, job)
        except Exception as exc:
            err.print(f"[red]error:[/] {escape(_plain(exc))}")
            return 1
    _show_plan(err, job)

    with _cpu_threads(device):
        try:
            pipeline, load_s = _load(err, args, device, use_demo)
        except Exception as exc:
            err.print(f"[red]error:[/] loading the model failed: {escape(_plain(exc))}")
            return 1
        try:
            return _run(err, out, job, pipeline, load_s)
        finally:
            pipeline.close()  # a multi-GPU ring's processes


def _request(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from wanstream.cli.parsers import parse_lora, parse_prompt, parse_steps
    from wanstream.jobs.generate import GenerateError, GenerateRequest

    if args.models_dir is not None and args.models_dir.exists() and not args.models_dir.is_dir():
        raise GenerateError(f"--models-dir {args.models_dir} is not a folder")
    fields = {
        "input": args.input,
        "output": args.output,
        "timeline": args.timeline,
        "prompts": tuple(parse_prompt(p) for p in args.prompt) if args.prompt else None,
        "mode": args.mode,
        "seed": args.seed,
        "steps": parse_steps(args.steps) if args.steps is not None else None,
        "noise_scale": args.noise_scale,
        "noise_controller": args.noise_controller,
        "vae": args.vae,
        "height": args.height,
        "width": args.width,
        "batching": args.batching,
        "frames": args.frames,
        "fps": args.fps,
        "stats_json": args.stats_json,
        "loras": tuple(parse_lora(spec) for spec in args.lora) if args.lora else None,
        "lora_mode": args.lora_mode,
        "control_video": args.control_video,
        "mask_video": args.mask_video,
        "ref_images": tuple(args.ref_image) if args.ref_image else None,
        "ref_once": args.ref_once,
        "first_frame": args.first_frame,
        "last_frame": args.last_frame,
        "vace_scale": args.vace_scale,
        "vace_corrected": args.vace_corrected,
    }
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:
        problems = [
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        ]
        raise GenerateError("; ".join(problems)) from None


def _missing_weights(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the real model's MissingWeightsError or None, an optional part's: TAEHV's for --vae taehv, the VACE
    module's for VACE inputs, or None).

    TAEHV and VACE are optional for the model but needed for --vae taehv and VACE inputs; when only they are
    missing, --demo does not stand in (the real model is there: only they need downloading)."""
    from wanstream.weights.store import MissingWeightsError, resolve_pipeline_files

    try:
        resolve_pipeline_files(models_dir=args.models_dir)
    except MissingWeightsError as exc:
        return exc, None
    try:
        resolve_pipeline_files(models_dir=args.models_dir, taehv=args.vae == "taehv", vace=_wants_vace(args))
    except MissingWeightsError as exc:
        return None, exc
    return None, None


_OPTIONAL_PARTS = {
    "taehv": "--vae taehv needs the TAEHV weights",
    "vace": "VACE (--control-video, --mask-video, --ref-image, --first-frame, --last-frame) needs the VACE module",
}


def _wants_vace(args: argparse.Namespace) -> bool:
    return any((args.control_video, args.mask_video, args.ref_image, args.first_frame, args.last_frame))


def _plan(request: Any, demo: bool) -> GeneratePlan:
    from wanstream.jobs.generate import plan

    return plan(request, demo=demo)


def _extend_prompts(err: Console, args: argparse.Namespace, job: GeneratePlan) -> GeneratePlan:
    """The plan with every prompt extended (before the video model loads, so the two never share memory)."""
    import dataclasses

    from wanstream.cli.extend_cmd import build_from_args
    from wanstream.prompting.timeline import extend_timeline
    from wanstream.weights.store import MissingWeightsError

    tokenizer = None
    if job.demo:  # the demo model encodes prompts with its own small tokenizer: count with that one
        from wanstream.engine.random_weights import demo_tokenizer
        from wanstream.models.text import PromptTokenizer

        tokenizer = PromptTokenizer(demo_tokenizer())
    try:
        extender = build_from_args(args, tokenizer=tokenizer)
    except MissingWeightsError as exc:
        raise RuntimeError(f"--extend-prompts: the prompt extender is not downloaded.\n{exc}") from None

    def shown(ext: Any) -> None:
        source = "cached" if ext.cached else f"{ext.seconds:.1f} s"
        err.print(f"extended: {ext.prompt!r} → {ext.umt5_tokens} tokens ({source})", markup=False)

    with err.status(f"extending prompts with {extender.backend.name}"):
        timeline, records = extend_timeline(job.timeline, extender, seed=job.settings.seed, on_extended=shown)
    return dataclasses.replace(job, timeline=timeline, extended_prompts=records)


def _show_plan(err: Console, job: GeneratePlan) -> None:
    from wanstream.jobs.generate.stats import frames_text

    s, src = job.settings, job.source
    frames = frames_text(src.frames) if src.frames is not None else "every frame"
    controller = "on" if s.noise_controller else "off"
    noise = "" if s.mode == "text" else f", noise {s.noise_scale:g} (controller {controller})"
    steps = ",".join(map(str, s.denoising_steps))
    lines = [
        f"input:    {src.describe()}",
        f"output:   {job.output} ({s.width}×{s.height}, {src.fps:g} fps, {frames})",
        f"settings: {s.mode} mode, seed {s.seed}, steps {steps}{noise}, batching {s.batching}, "
        f"vae {s.decoder}",
    ]
    segments = job.timeline.segments
    if len(segments) > 1:
        lines.append(f"prompts:  {len(segments)} timeline segments ({job.timeline.source})")
    else:
        lines.append(f"prompt:   {' + '.join(p.text for p in segments[0].prompts)}")
    if job.vace is not None:
        lines.append(f"vace:     {job.vace.describe()}")
    for path, scale, mode in s.lora_summary:
        lines.append(f"lora:     {path} at scale {scale:g} ({mode})")
    for line in lines:
        err.print(line, markup=False)
    for note in job.notes:
        err.print(f"[cyan]note:[/] {escape(note)}")
    for path, what in ((job.output, "output"), (job.stats_json, "stats file")):
        if path is not None and path.is_file():
            err.print(f"[yellow]note:[/] the {what} {escape(str(path))} exists: this run replaces it")


def _check_gpus(args: argparse.Namespace, device: Any) -> None:
    """--gpus N: a ring of N processes, one per GPU (or CPU processes with --device cpu)."""
    import torch

    from wanstream.engine.settings import RING_CONDITIONING_PROBLEM, RING_LORA_PROBLEM
    from wanstream.jobs.generate import GenerateError

    if args.gpus < 1:
        raise GenerateError(f"--gpus {args.gpus}: give a number of GPUs, 1 or more")
    if args.gpus == 1:
        return
    explicit_cpu = args.device is not None and device.type == "cpu"
    if not explicit_cpu and torch.cuda.device_count() < args.gpus:
        raise GenerateError(
            f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
            "use fewer, or --device cpu to run the multi-GPU path on CPU processes"
        )
    if _wants_vace(args):
        raise GenerateError(
            f"--gpus {args.gpus}: {RING_CONDITIONING_PROBLEM}; drop --gpus or the VACE inputs"
        )
    if args.lora:
        raise GenerateError(f"--gpus {args.gpus}: {RING_LORA_PROBLEM}; drop --gpus or --lora")


def _load(err: Console, args: argparse.Namespace, device: Any, demo: bool) -> tuple[Any, float]:
    from wanstream.pipeline import Pipeline

    start = time.perf_counter()
    if args.gpus > 1:
        pipeline = Pipeline.parallel(args.gpus, demo=demo, models_dir=args.models_dir, device=device.type)
    elif demo:
        pipeline = Pipeline.demo(device=device)
    else:
        from wanstream.cli.bench_cmd import low_vram_choices

        pipeline = Pipeline.load(
            args.models_dir,
            device=device,
            **low_vram_choices(args),
            taehv=args.vae == "taehv",
            vace=_wants_vace(args),
            progress=lambda msg: err.print(msg),
        )
    load_s = time.perf_counter() - start
    err.print(f"model:    {pipeline.label} on {device} (loaded in {load_s:.1f} s)")
    return pipeline, load_s


def _fits(err: Console, job: GeneratePlan, pipeline: Any) -> bool:
    """Before the first frame: the estimated memory and FPS of this job on this GPU (engine.estimate);
    False (with what to lower) when it clearly would not fit."""
    from wanstream.engine.estimate import preflight

    if pipeline.ring is not None:
        return True  # the DiT is spread over several GPUs: no one-GPU estimate applies
    fit = preflight(pipeline.components, job.settings)
    if fit.level == "refuse":
        err.print(f"[red]error:[/] {escape(fit.message)}")
        return False
    if fit.message:
        err.print(
            f"[yellow]warning:[/] {escape(fit.message)}"
            if fit.level == "warn"
            else f"[dim]{escape(fit.message)}[/]"
        )
    return True


def _run(err: Console, out: Console, job: GeneratePlan, pipeline: Any, load_s: float) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from wanstream.jobs.generate import GenerateError, GenerationInterrupted, run
    from wanstream.media.video import VideoError

    if not _fits(err, job, pipeline):
        return 1

    columns = (
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames  {task.fields[fps]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    try:
        if err.is_terminal:
            with Progress(*columns, console=err) as bar:
                task = bar.add_task("generate", total=job.source.frames, fps="")

                def on_progress(p: GenerateProgress) -> None:
                    fps = p.frames / p.elapsed_s if p.elapsed_s > 0 else 0.0
                    bar.update(task, completed=p.frames, fps=f"{fps:.1f} fps")

                result = run(job, pipeline, on_progress=on_progress, load_s=load_s)
        else:  # a log file, CI, nohup: a plain line every few seconds instead of a bar
            result = run(job, pipeline, on_progress=ProgressLines(err), load_s=load_s)
    except GenerationInterrupted as exc:
        partial = exc.result
        if partial.output is not None:
            err.print(
                f"[yellow]interrupted:[/] kept the {partial.stats.frames} frames generated so far in "
                f"{escape(str(partial.output))} (a valid MP4)"
            )
            _summary(out, partial)
        else:
            err.print("[yellow]interrupted[/] before the first frame: no output written")
        return 130
    except VideoError as exc:  # the input turned out unreadable part-way (e.g. truncated)
        err.print(f"[red]error:[/] {escape(str(exc))} (no output written)")
        return 2
    except GenerateError as exc:  # found once the model is there (a LoRA that does not fit it)
        err.print(f"[red]error:[/] {escape(str(exc))} (no output written)")
        return 2
    except Exception as exc:
        traceback.print_exc()
        err.print(f"[red]error:[/] generation failed: {escape(_plain(exc))} (no output written)")
        return 1
    _summary(out, result)
    return 0


PROGRESS_EVERY_S = 5.0


class ProgressLines:
    """Progress for a log rather than a terminal: one line every `every_s` seconds (frames, FPS, ETA)."""

    def __init__(self, console: Console, every_s: float | None = None) -> None:
        self.console = console
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.next_at = self.every_s

    def __call__(self, p: GenerateProgress) -> None:
        if p.elapsed_s < self.next_at:
            return
        self.next_at = p.elapsed_s + self.every_s
        fps = p.frames / p.elapsed_s if p.elapsed_s > 0 else 0.0
        done = (
            f"{p.frames}/{p.total} frames ({100 * p.frames / p.total:.0f}%)"
            if p.total
            else f"{p.frames} frames"
        )
        eta = ""
        if p.total and fps > 0:
            eta = f", ETA {_clock(max(p.total - p.frames, 0) / fps)}"
        self.console.print(
            f"generating: {done}, {fps:.1f} fps, {_clock(p.elapsed_s)} elapsed{eta}", markup=False
        )


def _clock(seconds: float) -> str:
    """'0:07', '1:02:03'."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _summary(out: Console, result: GenerateResult) -> None:
    from wanstream.jobs.generate.stats import frames_text

    s, job = result.stats, result.plan
    label = "  [bold yellow](DEMO MODEL, RANDOM WEIGHTS)[/]" if job.demo else ""
    where = escape(str(result.output)) if result.output is not None else "(nothing written)"
    verb = "[yellow]wrote (interrupted, partial)[/]" if result.interrupted else "[green]wrote[/]"
    out.print(
        f"{verb} {where}: {frames_text(s.frames)}, {job.settings.width}×{job.settings.height} at "
        f"{job.source.fps:g} fps{label}"
    )
    for line in s.summary_lines():
        out.print(f"  {line}", markup=False)
    if len(job.timeline.segments) > 1:
        out.print("  prompt switches (a new prompt applies from the chunk containing its first frame):")
        for switch in result.switches:
            out.print(f"    {switch.describe()}", markup=False)
    if job.vace is not None:
        out.print(f"  {_vace_summary(result)}", markup=False)
    for note in result.notes[len(job.notes) :]:
        out.print(f"  [cyan]note:[/] {escape(note)}")
    if job.stats_json is not None:
        out.print(f"  stats: {job.stats_json}", markup=False)


def _vace_summary(result: GenerateResult) -> str:
    """e.g. 'vace: conditioning ×11, extension:lastframe ×1; scale 1 from chunk 0, 0.5 from chunk 6'."""
    from collections import Counter

    from wanstream.jobs.generate.vace import scale_changes

    modes = Counter(c.mode for c in result.vace)
    used = ", ".join(f"{mode} ×{n}" for mode, n in modes.items()) or "no chunk"
    scales = ", ".join(f"{scale:g} from chunk {chunk}" for chunk, scale in scale_changes(result.vace))
    return f"vace: {used}; scale {scales or '-'}"


@contextlib.contextmanager
def _cpu_threads(device: Any) -> Iterator[None]:
    """On a CPU, leave one core to video decoding/encoding: torch's intra-op threads spin at their barriers,
    and one of them losing its core to the media path stalls every parallel op."""
    import torch

    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plain(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    from wanstream.cli.main import main

    sys.exit(main(["generate", *sys.argv[1:]]))
