"""Measure our fp8 path's error on the golden cases and write the fp8 bounds (src/wanstream/conformance/
fp8_bounds.json) that `python -m wanstream.conformance DIR --dtype bfloat16 --precision fp8` checks.

The reference implementations have no float8 path, so unlike the bf16 bounds (2 x the reference's own bf16
error) these come from ours: each DiT family's cases run in bfloat16 with the DiT's block layers in float8 and
float8 GEMMs forced (`RunOptions.precision="fp8"`; on the CPU, torch's `_scaled_mm` does the GPU's arithmetic:
float8 inputs, float32 accumulation), every compared tensor's rel-L2 against the float32 goldens is recorded,
and the bound per tensor class is FACTOR x the worst, rounded up to two digits. What it guards: a change that
makes the fp8 path less accurate than it was measured here. Families without a DiT are listed as such (their
cases run as in bf16).

Usage (repo root): python tools/golden/measure_fp8.py tests/golden tests/golden-vace [--write]
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import torch

from wanstream.conformance import discover
from wanstream.conformance.case import CaseReport
from wanstream.conformance.families import FAMILIES
from wanstream.conformance.runner import FP8_BOUNDS_FILE, RunOptions, family_bf16_bounds

FACTOR = 2.0
DIT_FAMILIES = (
    "dit_forward", "causal_stream_calls", "stream_v2v_end_to_end", "vace_blocks_forward", "vace_stream", "vace_ref"
)  # fmt: skip


# Classes of compared tensors the families name that the bf16 bounds fold into "default".
EXTRA_CLASSES = {"causal_stream_calls": ("final_kv_cache",)}


def round_up(value: float) -> float:
    """Up to two significant digits, never below `value`."""
    digits = 1 - math.floor(math.log10(value))
    return math.ceil(value * 10**digits) / 10**digits


def measure(directories: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """family → case → compared tensor's class:name → rel-L2 (fp8 path vs the float32 golden)."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for directory in directories:
        for case in discover(directory).cases:
            if case.kind not in DIT_FAMILIES:
                continue
            classes = sorted(
                {*(family_bf16_bounds(case.kind) or {}), "default", *EXTRA_CLASSES.get(case.kind, ())}
            )
            # Each class gets its own (unreachable) bound, so every check says which class it was compared as.
            sentinel = {cls: 1e9 * (i + 1) for i, cls in enumerate(classes)}
            options = RunOptions(
                dtype=torch.bfloat16, precision="fp8", reduced_bounds=sentinel, exact_informational=True
            )
            report = CaseReport(case.name, exact_informational=True)
            with torch.inference_mode():
                importlib.import_module(FAMILIES[case.kind]).run(case, report, options)
            by_bound = {v: k for k, v in sentinel.items()}
            errors = {
                f"{by_bound[c.bound]}:{c.name}": c.rel_l2 for c in report.checks if c.rel_l2 is not None
            }
            found.setdefault(case.kind, {})[case.name] = errors
            worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
            print(case.name, "worst:", ", ".join(f"{k} {v:.4f}" for k, v in worst), flush=True)
    return found


def main() -> None:
    write = "--write" in sys.argv
    directories = [Path(a) for a in sys.argv[1:] if a != "--write"]
    measured = measure(directories)
    families: dict[str, object] = {}
    for kind in FAMILIES:
        if kind not in DIT_FAMILIES:
            families[kind] = {
                "note": "no DiT in this family: --precision fp8 changes nothing, the bf16 bounds hold"
            }
            continue
        worst: dict[str, float] = {}
        for errors in measured.get(kind, {}).values():
            for key, err in errors.items():
                cls = key.split(":", 1)[0]
                worst[cls] = max(worst.get(cls, 0.0), err)
        families[kind] = {
            "measured": measured.get(kind, {}),
            "measured_worst": worst,
            "bounds": {cls: round_up(FACTOR * err) for cls, err in worst.items()},
        }
    data = {
        "factor": FACTOR,
        "how": "ours_fp8_vs_float32_golden_rel_l2: each case of a DiT family run in bfloat16 with the DiT's block "
        "layers in float8 and float8 GEMMs (per-token activation scales, float32 accumulation), CPU, torch "
        f"{torch.__version__}; bounds = factor x measured worst per tensor class, rounded up to two digits. "
        "Written by tools/golden/measure_fp8.py --write.",
        "families": families,
    }
    print(json.dumps({k: v.get("bounds") for k, v in families.items() if isinstance(v, dict)}, indent=1))
    if write:
        FP8_BOUNDS_FILE.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {FP8_BOUNDS_FILE}")


if __name__ == "__main__":
    main()
