"""Run a session log again: the same calls, with the same frames, on a fresh session.

Every output frame is checked against the digest the live stream recorded for it (frames the live side
never sent — those a cut discarded — have none), and every call's frame count against the live one. On the
same device kind, dtype and model files the frames are identical (the engine is deterministic); elsewhere
the replay runs, and the report says what differs and why the frames may.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wanstream.engine.components import Components
from wanstream.engine.journal import CONDITIONER, FRAMES, autograd_mode, frame_digest
from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import VaceConditioner
from wanstream.models import numerics
from wanstream.takes.identity import differences, model_identity
from wanstream.takes.log import LogError, TakeLog

OnFrames = Callable[[int, np.ndarray], None]  # (output index of the first, frames [T, H, W, 3])


@dataclass
class ReplayReport:
    frames: int = 0  # output frames the replay made
    compared: int = 0  # of them, frames the live stream sent (with a digest)
    identical: int = 0
    first_mismatch: int | None = None  # output index of the first frame that differs
    count_mismatches: list[str] = field(default_factory=list)  # calls that returned another number of frames
    differences: list[str] = field(default_factory=list)  # model / device / version differences
    truncated: str | None = None  # the log stopped early (the take replays up to there)

    @property
    def bit_exact(self) -> bool:
        return self.compared > 0 and self.identical == self.compared and not self.count_mismatches

    def summary(self) -> str:
        lines = [
            f"{self.frames} frames replayed; {self.identical} of {self.compared} frames the live stream sent "
            "are identical bit for bit"
            + (
                ""
                if self.first_mismatch is None
                else f" (the first that differs: output frame {self.first_mismatch})"
            )
        ]
        lines += [f"frame count differs: {m}" for m in self.count_mismatches]
        if self.differences:
            lines.append(
                "this run differs from the take's (frames may differ: kernels, rounding and weights are not "
                "the same): " + "; ".join(self.differences)
            )
        elif not self.bit_exact and self.compared:
            lines.append(
                "same model, dtype and device kind, yet the frames differ: please report this with the log"
            )
        if self.truncated:
            lines.append(f"the log is truncated: {self.truncated}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "compared": self.compared,
            "identical": self.identical,
            "bit_exact": self.bit_exact,
            "first_mismatch": self.first_mismatch,
            "count_mismatches": self.count_mismatches,
            "differences": self.differences,
            "truncated": self.truncated,
        }


def replay(
    log: TakeLog,
    components: Components,
    *,
    on_frames: OnFrames | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Replay `log` on `components`; `on_frames` gets every output frame from the take's first on (host
    memory), `progress(done, total)` the calls. Raises LogError for a log that cannot be replayed."""
    reason = log.header.get("unreplayable")
    if reason:
        raise LogError(f"this log cannot be replayed: {reason}")
    threads = log.model.get("cpu_threads")
    if components.device.type != "cpu" or not threads:
        return _replay(log, components, on_frames, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))  # the live stream's split of every CPU reduction
    try:
        return _replay(log, components, on_frames, progress)
    finally:
        torch.set_num_threads(before)


def _replay(
    log: TakeLog,
    components: Components,
    on_frames: OnFrames | None,
    progress: Callable[[int, int], None] | None,
) -> ReplayReport:
    report = ReplayReport(
        differences=differences(log.model, model_identity(components, list(log.model.get("loras", {})))),
        truncated=log.header.get("truncated"),
    )
    with autograd_mode(log.grad_mode):  # its buffers inference tensors or not, as the live session's were
        session = StreamSession(
            components,
            StreamSettings.model_validate(log.settings),
            output=log.output,  # type: ignore[arg-type]
        )
    conditioner: VaceConditioner | None = None
    made = 0
    try:
        for done, op in enumerate(log.ops):
            if op.target == "marker":  # a pause or resume: nothing to run
                continue
            # Each call in the autograd mode it ran in live (compiled code is specialised on it), compiled or
            # eager call by call, and on a CUDA graph or not step by step, as the live stream ran it.
            with autograd_mode(op.grad_mode):
                args = _arguments(op.name, _decode(op.args, log, conditioner))
                if op.target == "vace" and op.name == "create":
                    conditioner = VaceConditioner(session, **args)
                    continue
                target: Any = session if op.target == "session" else conditioner
                if target is None:
                    raise LogError(f"call {op.index} ({op.target}.{op.name}) comes before its conditioner")
                with numerics.force(op.eager, op.graphs):
                    out = getattr(target, op.name)(**args)
            count = int(out.shape[0]) if isinstance(out, torch.Tensor) and out.dim() == 4 else 0
            if count != op.outputs or made != op.first_output:
                report.count_mismatches.append(
                    f"call {op.index} ({op.name}) returned {count} frames from output frame {made}; "
                    f"live: {op.outputs} from {op.first_output}"
                )
            if count:
                _check(report, made, out.cpu().numpy(), log, on_frames)
            made += count
            if progress is not None:
                progress(done + 1, len(log.ops))
    finally:
        session.close("replay finished")
    return report


def _check(
    report: ReplayReport, first: int, frames: np.ndarray, log: TakeLog, on_frames: OnFrames | None
) -> None:
    report.frames += frames.shape[0]
    for j in range(frames.shape[0]):
        live = log.digests.get(first + j)
        if live is None:
            continue
        report.compared += 1
        if frame_digest(frames[j]) == live:
            report.identical += 1
        elif report.first_mismatch is None:
            report.first_mismatch = first + j
    start = max(log.first_output - first, 0)
    if on_frames is not None and start < frames.shape[0]:
        on_frames(first + start, frames[start:])


def _decode(value: Any, log: TakeLog, conditioner: VaceConditioner | None) -> Any:
    if isinstance(value, dict):
        if FRAMES in value:
            return log.frames(int(value[FRAMES]))
        if CONDITIONER in value:
            return conditioner
        return {k: _decode(v, log, conditioner) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, log, conditioner) for v in value]
    return value


def _arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The recorded JSON of prompts and transitions as the objects the methods take."""
    if name == "set_prompts":
        prompts = args["prompts"]
        args["prompts"] = [_prompt(p) for p in prompts] if isinstance(prompts, list) else _prompt(prompts)
    if args.get("transition") is not None:
        args["transition"] = Transition.model_validate(args["transition"])
    return args


def _prompt(value: Any) -> str | WeightedPrompt:
    return value if isinstance(value, str) else WeightedPrompt.model_validate(value)
