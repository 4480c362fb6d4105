"""What a `generate` run reports: progress while it runs, then a `GenerateResult` (the statistics, the
prompt switches, the engine's event log; `to_dict()` is the --stats-json file)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from wanstream.engine.session import ChunkEvent
from wanstream.engine.vace import VaceChunk
from wanstream.jobs.generate.planning import GeneratePlan
from wanstream.jobs.generate.stats import GenerateStats, rounded
from wanstream.jobs.generate.vace import chunks_to_json


class GenerateProgress(NamedTuple):
    frames: int  # output frames written so far
    total: int | None  # expected output frames (None: unknown)
    elapsed_s: float


@dataclass
class PromptSwitch:
    """When a timeline segment took effect."""

    segment: int  # index into the timeline's segments
    start_time: float  # the segment's start (s)
    frame: int  # first frame at or after start_time (input frame; output frame in text mode)
    frame_time: float  # that frame's timestamp (s)
    chunk: int | None  # the engine chunk that first used it (see the event log)
    chunk_frames: tuple[int, int] | None  # that chunk's [start, end) frames (input; output in text mode)
    transition_chunks: int  # chunks of blending into it (0: at once)
    prompts: tuple[tuple[str, float], ...]  # (text, normalised weight)

    def describe(self) -> str:
        where = f"frame {self.frame} ({self.frame_time:.2f} s)"
        if self.chunk_frames is not None:
            where += f" → chunk {self.chunk} (frames {self.chunk_frames[0]}–{self.chunk_frames[1] - 1})"
        how = f", blending over {self.transition_chunks} chunks" if self.transition_chunks else ""
        text = self.prompts[0][0] if len(self.prompts) == 1 else f"{len(self.prompts)} prompts blended"
        text = text if len(text) <= 60 else text[:57] + "..."
        return f"segment {self.segment + 1} from {where}{how}: {text}"


@dataclass
class GenerateResult:
    plan: GeneratePlan
    output: Path | None  # None when no frame was written
    stats: GenerateStats
    events: list[ChunkEvent]  # the engine's event log of every chunk (input, flush and text chunks)
    switches: list[PromptSwitch]
    model: str
    device: str
    dtype: str
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # the plan's notes and what the run found
    vace: list[VaceChunk] = field(default_factory=list)  # with VACE: what each chunk used (mode, scale, ...)

    def to_dict(self) -> dict[str, Any]:
        s, p = self.stats, self.plan
        return {
            "output": str(self.output) if self.output is not None else None,
            "interrupted": self.interrupted,
            "model": self.model,
            "demo": p.demo,
            "device": self.device,
            "dtype": self.dtype,
            "mode": p.settings.mode,
            "input": p.source.describe(),
            "height": p.settings.height,
            "width": p.settings.width,
            "fps": p.source.fps,
            "frames": s.frames,
            "input_frames": s.input_frames,
            "chunks": s.chunks,
            "wall_s": rounded(s.wall_s),
            "load_s": rounded(s.load_s),
            "overall_fps": rounded(s.overall_fps),
            "time_to_first_frame_s": rounded(s.time_to_first_frame_s),
            "first_chunk_ms": rounded(s.first_chunk_ms),
            "steady_state_fps": rounded(s.steady_fps),
            "steady_state_chunks": s.steady_chunks,
            "chunk_latency_p50_ms": rounded(s.chunk_latency_p50_ms),
            "chunk_latency_p90_ms": rounded(s.chunk_latency_p90_ms),
            "settings": {**p.settings.model_dump(mode="json"), "steps": list(p.settings.denoising_steps)},
            "denoising_steps": list(p.settings.denoising_steps),
            "prompt_switches": [
                {
                    "segment": w.segment,
                    "start_time": w.start_time,
                    "frame": w.frame,
                    "frame_time": rounded(w.frame_time),
                    "chunk": w.chunk,
                    "chunk_frames": list(w.chunk_frames) if w.chunk_frames is not None else None,
                    "transition_chunks": w.transition_chunks,
                    "prompts": [{"text": t, "weight": wt} for t, wt in w.prompts],
                }
                for w in self.switches
            ],
            "notes": list(self.notes),
            **({"vace": self._vace_dict()} if p.vace is not None else {}),
            **({"extended_prompts": list(p.extended_prompts)} if p.extended_prompts else {}),
        }

    def _vace_dict(self) -> dict[str, Any]:
        v = self.plan.vace
        assert v is not None
        return {
            "inputs": v.describe(),
            "control_video": str(v.control.path) if v.control is not None else None,
            "mask_video": str(v.mask.path) if v.mask is not None else None,
            "ref_images": [str(p) for p in v.references],
            "ref_once": v.references_once,
            "first_frame": str(v.first_frame) if v.first_frame is not None else None,
            "last_frame": str(v.last_frame) if v.last_frame is not None else None,
            "scale": v.scale,
            "corrected": v.corrected,
            "chunks": chunks_to_json(self.vace),
        }

    def summary(self) -> str:
        return "\n".join(self.stats.summary_lines())

    def write_stats(self, path: Path) -> None:
        """Write `to_dict()` as JSON, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the frames generated so far were kept as a valid MP4 (`result.output`)."""

    def __init__(self, result: GenerateResult) -> None:
        super().__init__("interrupted")
        self.result = result
