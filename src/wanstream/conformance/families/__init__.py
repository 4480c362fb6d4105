"""Golden-case families: manifest `kind` → the module that replays it.

Each module exposes `run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None`.
Modules are imported lazily so one unfinished family never breaks the others.
"""

from __future__ import annotations

FAMILIES: dict[str, str] = {
    "dit_forward": "wanstream.conformance.families.dit",
    "causal_stream_calls": "wanstream.conformance.families.causal",
    "sched_tables": "wanstream.conformance.families.sched",
    "sched_noise_controller": "wanstream.conformance.families.sched",
    "t5_encoder": "wanstream.conformance.families.t5",
    "vae_roundtrip": "wanstream.conformance.families.vae",
    "vae_stream": "wanstream.conformance.families.vae",
    "tae_roundtrip": "wanstream.conformance.families.tae",
    "stream_v2v_end_to_end": "wanstream.conformance.families.stream",
    "vace_blocks_forward": "wanstream.conformance.families.vace",
    "vace_stream": "wanstream.conformance.families.vace",
    "vace_ref": "wanstream.conformance.families.vace",
}
