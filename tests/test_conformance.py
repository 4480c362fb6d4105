"""Every golden case in the repo replays within its manifest tolerances (one test per case)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanstream.conformance import GoldenCase, discover, run_case
from wanstream.conformance.runner import RunOptions, family_bf16_bounds, fp8_bounds, main

GOLDEN_DIRS = [Path(__file__).parent / "golden", Path(__file__).parent / "golden-vace"]
CASES = [case for d in GOLDEN_DIRS for case in discover(d).cases]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_case(case: GoldenCase) -> None:
    outcome = run_case(case)  # an unimplemented family is a failure here, as it is for the CLI
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or "\n".join(failed[:20])


def test_every_family_has_cases_in_the_repo() -> None:
    """An empty or lost golden folder would leave test_golden_case with nothing to run (a silent skip)."""
    from wanstream.conformance.families import FAMILIES

    assert {c.kind for c in CASES} == set(FAMILIES)
    assert len(CASES) >= 16  # 13 in golden (12 shared + the RoPE-reset case), 3 in golden-vace


@pytest.mark.parametrize("directory", GOLDEN_DIRS, ids=lambda d: d.name)
def test_every_file_in_the_golden_folders_is_understood(directory: Path) -> None:
    assert discover(directory).not_understood == []


def test_runner_fails_on_a_file_it_does_not_understand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = GOLDEN_DIRS[0]
    for name in ("sched_tables.json", "sched_tables.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    assert main([str(tmp_path)]) == 0
    (tmp_path / "stray.bin").write_bytes(b"?")
    assert main([str(tmp_path)]) == 1
    assert "stray.bin" in capsys.readouterr().out


def test_runner_reports_a_corrupted_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = GOLDEN_DIRS[0]
    (tmp_path / "sched_tables.json").write_bytes((src / "sched_tables.json").read_bytes())
    data = bytearray((src / "sched_tables.safetensors").read_bytes())
    data[-8:] = b"\x00" * 8  # the manifest's sha256 no longer matches
    (tmp_path / "sched_tables.safetensors").write_bytes(bytes(data))
    assert main([str(tmp_path)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out


BF16_CASES = [c for c in CASES if family_bf16_bounds(c.kind) is not None]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c.name for c in BF16_CASES])
def test_bfloat16_meets_the_bound_derived_from_the_references_own_bfloat16(case: GoldenCase) -> None:
    import torch

    outcome = run_case(case, RunOptions(dtype=torch.bfloat16))
    bounds = family_bf16_bounds(case.kind)
    assert bounds is not None
    compared = [c for c in outcome.report.checks if c.rel_l2 is not None]
    assert compared and all(c.bound in bounds.values() for c in compared)  # the family's bounds were used
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or "\n".join(failed[:20])


def test_the_bf16_bounds_are_the_stated_factor_times_the_references_own_error() -> None:
    from wanstream.conformance.families import FAMILIES
    from wanstream.conformance.runner import bf16_bounds

    data = bf16_bounds()
    assert 1.0 <= data["factor"] <= 3.0  # "within a small factor" of what the reference achieves
    assert set(data["families"]) == set(FAMILIES)  # every family is bounded or says why not
    for kind, entry in data["families"].items():
        if not entry.get("bounds") or kind.startswith("sched"):
            continue
        for cls, bound in entry["bounds"].items():
            worst = max(
                err
                for errors in entry["reference"].values()
                for name, err in errors.items()
                if not name.startswith("check")
                and (name == cls or (cls == "default" and name not in entry["bounds"]))
            )
            assert worst == entry["reference_worst"][cls] and worst > 0
            assert data["factor"] * worst <= bound <= 1.1 * data["factor"] * worst, (kind, cls)
        # the drivers reproduced the case in float32 before their bf16 number was trusted
        assert all(
            errors["check_float32_run_vs_golden"] < 1e-5
            for errors in entry["reference"].values()
            if "check_float32_run_vs_golden" in errors
        )


def test_every_family_has_a_measured_bf16_bound() -> None:
    """A family without a bound would drop out of the bf16 test above (it has no cases to run there)."""
    from wanstream.conformance.families import FAMILIES

    assert {c.kind for c in BF16_CASES} == set(FAMILIES)
    for kind in ("vace_blocks_forward", "vace_stream", "vace_ref"):  # measured from Daydream Scope's code
        entry = family_bf16_bounds(kind)
        assert entry is not None and set(entry) == {"default"}


@pytest.mark.parametrize("entry", [None, {"note": "not measured: no bf16 driver", "bounds": None}])
def test_an_unmeasured_family_is_not_passed_in_bfloat16(
    entry: dict | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    import torch

    from wanstream.conformance import runner

    data = copy.deepcopy(runner.bf16_bounds())
    case = next(c for c in CASES if c.kind == "dit_forward")
    if entry is None:
        del data["families"]["dit_forward"]
    else:
        data["families"]["dit_forward"] = entry
    monkeypatch.setattr(runner, "bf16_bounds", lambda: data)
    outcome = run_case(case, RunOptions(dtype=torch.bfloat16))
    assert outcome.status == "ERROR" and "no measured bf16 bound for dit_forward" in outcome.message
    assert (entry or {"note": "not in bf16_bounds.json"})["note"] in outcome.message


def test_help_states_the_bf16_bound_of_every_family(capsys: pytest.CaptureFixture) -> None:
    from wanstream.conformance.families import FAMILIES
    from wanstream.conformance.runner import bf16_bounds

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    factor = bf16_bounds()["factor"]
    assert (
        f"{factor:g} x the worst\nerror the reference itself makes in bf16 against its own float32 run"
        in text
    )
    for kind in FAMILIES:
        assert f"  {kind} " in text


FP8_CASES = [c for c in CASES if (fp8_bounds()["families"].get(c.kind) or {}).get("bounds")]


@pytest.mark.parametrize("case", FP8_CASES, ids=[c.name for c in FP8_CASES])
def test_an_fp8_dit_meets_its_stated_bound(case: GoldenCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--precision fp8`: the DiT's block layers in float8 with float8 GEMMs (forced here on the CPU, whose
    `_scaled_mm` does the GPU's arithmetic), within the family's fp8 bound."""
    import torch

    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    outcome = run_case(case, RunOptions(dtype=torch.bfloat16, precision="fp8"))
    assert calls  # the float8 GEMMs ran
    bounds = fp8_bounds()["families"][case.kind]["bounds"]
    compared = [c for c in outcome.report.checks if c.rel_l2 is not None]
    assert compared and all(c.bound in bounds.values() for c in compared)  # the fp8 bounds were used
    assert outcome.report.exact_informational  # a flipped sink decision is reported, not failed
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or "\n".join(failed[:20])


def test_the_fp8_bounds_are_the_stated_factor_times_our_measured_error() -> None:
    from wanstream.conformance.families import FAMILIES

    data = fp8_bounds()
    assert data["factor"] == 2.0 and set(data["families"]) == set(FAMILIES)
    with_dit = {k for k, v in data["families"].items() if v.get("bounds")}
    assert with_dit == {
        "dit_forward", "causal_stream_calls", "stream_v2v_end_to_end", "vace_blocks_forward", "vace_stream", "vace_ref"
    }  # fmt: skip
    for kind, entry in data["families"].items():
        if kind not in with_dit:
            assert "no DiT" in entry["note"]
            continue
        for cls, bound in entry["bounds"].items():
            worst = max(
                err
                for errors in entry["measured"].values()
                for key, err in errors.items()
                if key.startswith(f"{cls}:")
            )
            assert worst == entry["measured_worst"][cls] and worst > 0
            assert data["factor"] * worst <= bound <= 1.1 * data["factor"] * worst, (kind, cls)


def test_fp8_needs_bfloat16_and_help_states_the_fp8_bounds(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(GOLDEN_DIRS[0]), "--precision", "fp8"])
    assert "--precision fp8 needs --dtype bfloat16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "fp8 bounds (--precision fp8)" in text
    for kind, entry in fp8_bounds()["families"].items():
        if entry.get("bounds"):
            assert f"  {kind} " in text.split("fp8 bounds")[1]


def test_an_unimplemented_family_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanstream.conformance.families import FAMILIES

    src = GOLDEN_DIRS[0]
    for name in ("sched_tables.json", "sched_tables.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    monkeypatch.setitem(FAMILIES, "sched_tables", "wanstream.conformance.families.not_written_yet")
    outcome = run_case(discover(tmp_path).cases[0])
    assert not outcome.ok and outcome.message == "not implemented: sched_tables"  # test_golden_case fails
    assert main([str(tmp_path)]) == 1


def _copy_case(src: Path, dst: Path, name: str, manifest: dict | None = None) -> Path:
    """A case (and the side files its manifest names) copied into `dst`, optionally with another manifest."""
    import json

    man = manifest or json.loads((src / f"{name}.json").read_text())
    for f in [f"{name}.safetensors", *man.get("weights", {}).get("files", {})]:
        (dst / f).write_bytes((src / f).read_bytes())
    path = dst / f"{name}.json"
    path.write_text(json.dumps(man))
    return path


def test_the_stream_loop_is_read_from_the_manifest(tmp_path: Path) -> None:
    import json

    from wanstream.conformance import CaseError
    from wanstream.conformance.families.stream import reference_loop

    src = GOLDEN_DIRS[0]
    # inference.py's offline loop has no reset; inference_wo_batch.py's resets at frame 50 (both say so).
    assert reference_loop(GoldenCase(src / "stream_v2v_batch.json")) == ("stream", None)
    assert reference_loop(GoldenCase(src / "stream_v2v_wo_batch.json")) == ("none", 50)
    assert reference_loop(GoldenCase(src / "stream_v2v_wo_batch_rope_reset.json")) == ("none", 50)
    man = json.loads((src / "stream_v2v_wo_batch.json").read_text())
    man["loop_description"] = "chunks go in, frames come out"  # says nothing about positions
    silent = _copy_case(src, tmp_path, "stream_v2v_wo_batch", man)
    with pytest.raises(CaseError, match="does not say whether the loop resets"):
        reference_loop(GoldenCase(silent))


def test_the_rope_reset_case_fails_a_runner_that_ignores_the_reset(tmp_path: Path) -> None:
    """The old runner hard-coded "no reset" for every stream case; this case must catch that."""
    import json

    src, name = GOLDEN_DIRS[0], "stream_v2v_wo_batch_rope_reset"
    man = json.loads((src / f"{name}.json").read_text())
    assert man["loop"]["rope_reset_at_dit_calls"] == [98]  # the case does cross the reset
    del man["loop"]
    man["loop_description"] = "as recorded, but claimed to have no position reset"
    outcome = run_case(GoldenCase(_copy_case(src, tmp_path, name, man)))
    failed = [c.name for c in outcome.report.checks if not c.passed]
    assert outcome.status == "FAIL"
    assert "outputs/final_video" in failed
    per_call = [n for n in failed if n.startswith("dit call") or n.startswith("outputs/trace")]
    assert per_call[0] == "dit call 98 current_start"  # every call before the reset still matches
