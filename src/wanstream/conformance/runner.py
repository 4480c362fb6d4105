"""`python -m wanstream.conformance DIR`: replay every golden case in DIR and report each tensor.

Exit status is non-zero when any case fails, when any file in DIR is not understood, or (without
`--allow-missing`) when a case belongs to a family that is not implemented yet.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.families import FAMILIES
from wanstream.models.dit import WanDiT
from wanstream.models.fp8 import dit_to_fp8_


@dataclass(frozen=True)
class RunOptions:
    """How to replay: device and compute dtype (the manifests' bounds hold for float32 only)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # "fp8" (bfloat16 only): the DiT's block layers in float8 with float8 GEMMs where the product uses them
    # (`models.fp8`), forced on whatever device runs the cases (the CPU's `_scaled_mm` does the same
    # arithmetic), compared within the family's bound in fp8_bounds.json.
    precision: str = "bf16"
    # Reduced precision compares against the float32 goldens with the bounds of the case's family in
    # bf16_bounds.json (class → bound, see `bf16_bounds`), set per case by `run_case`, and reports exact
    # checks (sink decisions, rounded steps) without failing on them: bf16 rounding may legitimately flip a
    # decision whose float32 margin is 1e-3.
    reduced_bounds: Mapping[str, float] | None = None
    exact_informational: bool = False

    @property
    def reduced(self) -> bool:
        return self.dtype != torch.float32

    def bound(self, value: float, what: str = "default") -> float:
        """The bound for a compared tensor: the manifest's float32 `value`, or in reduced precision the
        family's measured bound for `what` (a class such as "final_video"; "default" for the others)."""
        if self.reduced_bounds is None:
            return value
        return self.reduced_bounds[what if what in self.reduced_bounds else "default"]

    def dit(self, dit: WanDiT) -> WanDiT:
        """A family's DiT as loaded, in this run's precision."""
        if self.precision == "fp8":
            dit_to_fp8_(dit, float8_compute=True)
        return dit


BF16_BOUNDS_FILE = Path(__file__).with_name("bf16_bounds.json")


@functools.cache
def bf16_bounds() -> dict[str, Any]:
    """bf16_bounds.json: per family, the reference's own bf16-vs-float32 errors and our bounds from them."""
    return json.loads(BF16_BOUNDS_FILE.read_text())


def family_bf16_bounds(kind: str | None) -> dict[str, float] | None:
    """class → bound for a family; None where the family is not measured (its cases cannot pass in bf16)."""
    entry = bf16_bounds()["families"].get(kind or "")
    return dict(entry["bounds"]) if entry and entry.get("bounds") else None


FP8_BOUNDS_FILE = Path(__file__).with_name("fp8_bounds.json")


@functools.cache
def fp8_bounds() -> dict[str, Any]:
    """fp8_bounds.json: per family with a DiT, our fp8 path's measured errors and the bounds from them; the
    families without one say so (their cases run as in bf16)."""
    return json.loads(FP8_BOUNDS_FILE.read_text())


def family_reduced_bounds(kind: str | None, precision: str) -> tuple[dict[str, float] | None, str]:
    """class → bound for a family at `precision` in bfloat16, and, where there is none, why."""
    if precision == "fp8":
        entry = fp8_bounds()["families"].get(kind or "")
        if entry is None:
            return None, "not in fp8_bounds.json"
        if entry.get("bounds"):
            return dict(entry["bounds"]), ""
        # No DiT in the family: precision changes nothing, the bf16 bounds hold.
    bounds = family_bf16_bounds(kind)
    note = bf16_bounds()["families"].get(kind or "", {}).get("note", "not in bf16_bounds.json")
    return bounds, "" if bounds is not None else note


@dataclass
class CaseOutcome:
    case: str
    kind: str | None
    status: str  # PASS | FAIL | SKIP | ERROR
    report: CaseReport
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "PASS"


@dataclass
class Discovery:
    cases: list[GoldenCase] = field(default_factory=list)
    not_understood: list[str] = field(default_factory=list)


def discover(directory: Path) -> Discovery:
    """Manifests in `directory`, and every file that no manifest accounts for."""
    found = Discovery()
    if not directory.is_dir():
        raise CaseError(f"{directory}: not a directory")
    referenced: set[str] = set()
    files = sorted(p for p in directory.iterdir() if p.is_file())
    for p in files:
        if p.suffix != ".json":
            continue
        case = GoldenCase(p)
        try:
            kind = case.kind
        except CaseError:
            kind = None
        if kind is not None:
            found.cases.append(case)
            referenced |= case.referenced_files()
    for p in files:
        if p.name in referenced or p.suffix == ".md":
            continue
        if p.suffix == ".json" and any(c.manifest_path == p for c in found.cases):
            continue
        found.not_understood.append(p.name)
    return found


def run_case(case: GoldenCase, options: RunOptions | None = None) -> CaseOutcome:
    """Replay one case; never raises (errors become an ERROR outcome with the traceback's last line)."""
    options = options or RunOptions()
    report = CaseReport(case.name, exact_informational=options.exact_informational)
    start = time.perf_counter()
    kind = None
    try:
        kind = case.kind
        if kind not in FAMILIES:
            return CaseOutcome(case.name, kind, "ERROR", report, f"unknown case kind {kind!r}")
        bad_files = case.verify_files()
        if bad_files:
            return CaseOutcome(case.name, kind, "ERROR", report, "corrupt files: " + ", ".join(bad_files))
        if options.reduced:
            bounds, note = family_reduced_bounds(kind, options.precision)
            if bounds is None:
                return CaseOutcome(
                    case.name,
                    kind,
                    "ERROR",
                    report,
                    f"no measured {options.precision} bound for {kind}: {note}",
                )
            options = replace(options, reduced_bounds=bounds, exact_informational=True)
            report.exact_informational = True  # the report was made before: it must know too
        module_name = FAMILIES[kind]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return CaseOutcome(case.name, kind, "SKIP", report, f"not implemented: {kind}")
            raise
        run = getattr(module, "run", None)
        if run is None:
            return CaseOutcome(case.name, kind, "SKIP", report, f"not implemented: {kind}")
        with torch.inference_mode():
            run(case, report, options)
    except CaseError as exc:
        return CaseOutcome(case.name, kind, "ERROR", report, str(exc), time.perf_counter() - start)
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        message = f"{type(exc).__name__}: {exc} (at {where})"
        return CaseOutcome(case.name, kind, "ERROR", report, message, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if not report.checks:
        return CaseOutcome(case.name, kind, "ERROR", report, "the family compared nothing", seconds)
    return CaseOutcome(case.name, kind, "PASS" if report.passed else "FAIL", report, "", seconds)


def run_directory(directory: Path, options: RunOptions | None = None) -> tuple[list[CaseOutcome], list[str]]:
    found = discover(directory)
    return [run_case(c, options) for c in found.cases], found.not_understood


def _print_outcome(outcome: CaseOutcome, verbose: bool) -> None:
    head = f"{outcome.case:<28} [{outcome.kind}]"
    tail = f" ({outcome.seconds:.1f} s)" if outcome.seconds else ""
    if outcome.status == "SKIP":
        print(f"{head}  SKIP ({outcome.message})")
        return
    print(f"{head}  {outcome.status}{tail}" + (f"  {outcome.message}" if outcome.message else ""))
    for check in outcome.report.checks:
        if verbose or not check.passed or check.rel_l2 is not None:
            status = "PASS" if check.passed else "FAIL"
            print(f"    {check.name:<44} {check.detail:<36} {status}")


def bf16_help() -> str:
    """The bf16 bounds per family, for --help."""
    data = bf16_bounds()
    lines = [
        "bfloat16 bounds: rel-L2 against the float32 goldens, per case family, each "
        f"{data['factor']:g} x the worst",
        "error the reference itself makes in bf16 against its own float32 run on that family's cases",
        "(measured on the CPU by tools/golden/reference_bf16.py, the VACE families from Daydream Scope's",
        "code by tools/golden/reference_bf16_vace.py; data: conformance/bf16_bounds.json):",
    ]
    for kind, entry in data["families"].items():
        if entry.get("bounds") and "reference" in entry:
            shown = ", ".join(f"{k} {v:.2g}" for k, v in entry["bounds"].items())
            worst = ", ".join(f"{v:.2g}" for v in entry["reference_worst"].values())
            lines.append(f"  {kind:<24} {shown} (reference: {worst})")
        elif entry.get("bounds"):
            lines.append(f"  {kind:<24} {entry['bounds']['default']:.2g}: {entry['note']}")
        else:
            lines.append(f"  {kind:<24} {entry['note']}")
    fp8 = fp8_bounds()
    lines += [
        "",
        f"fp8 bounds (--precision fp8): rel-L2 against the float32 goldens, {fp8['factor']:g} x the worst error our",
        "fp8 path (float8 weights and float8 GEMMs) makes on that family's cases, measured on the CPU by",
        "tools/golden/measure_fp8.py (no reference implementation of this arithmetic exists; data:",
        "conformance/fp8_bounds.json). Families without a DiT keep their bf16 bounds:",
    ]
    for kind, entry in fp8["families"].items():
        if entry.get("bounds"):
            shown = ", ".join(f"{k} {v:.2g}" for k, v in entry["bounds"].items())
            worst = ", ".join(f"{v:.2g}" for v in entry["measured_worst"].values())
            lines.append(f"  {kind:<24} {shown} (measured: {worst})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wanstream.conformance",
        description="Replay golden vectors against wanstream; one line per case and compared tensor.",
        epilog=bf16_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", type=Path, help="folder of golden cases (<case>.json + .safetensors)")
    parser.add_argument(
        "--allow-missing", action="store_true", help="families not implemented yet do not fail the run"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype; bfloat16 is compared with the float32 goldens within the family's bound below",
    )
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp8"],
        default="bf16",
        help="with --dtype bfloat16: fp8 runs the DiT's block layers in float8 with float8 GEMMs, compared "
        "within the family's fp8 bound below",
    )
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("-v", "--verbose", action="store_true", help="print exact-match checks too")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda"):
        # The golden bounds are float32 bounds: TF32 matmuls would blow them.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.precision == "fp8" and args.dtype != "bfloat16":
        parser.error("--precision fp8 needs --dtype bfloat16 (float8 GEMMs take and give bf16)")
    options = RunOptions(device=args.device, dtype=getattr(torch, args.dtype), precision=args.precision)
    try:
        found = discover(args.directory)
    except CaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cases = [c for c in found.cases if args.only is None or args.only in c.name]
    what = f"{args.dtype}, fp8 DiT" if args.precision == "fp8" else args.dtype
    print(f"wanstream conformance: {args.directory} ({len(cases)} cases, device {args.device}, {what})")
    outcomes = []
    for case in cases:
        outcome = run_case(case, options)
        _print_outcome(outcome, args.verbose)
        outcomes.append(outcome)
    for name in found.not_understood:
        print(f"{name:<28} NOT UNDERSTOOD (no manifest in this folder accounts for this file)")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    print(
        f"{counts['PASS']} passed, {counts['FAIL'] + counts['ERROR']} failed, {counts['SKIP']} skipped"
        + (f", {len(found.not_understood)} files not understood" if found.not_understood else "")
    )
    if counts["FAIL"] or counts["ERROR"] or found.not_understood:
        return 1
    if counts["SKIP"] and not args.allow_missing:
        print("some families are not implemented (use --allow-missing to accept that)")
        return 1
    if not outcomes:
        print("no golden cases found")
        return 1
    return 0
