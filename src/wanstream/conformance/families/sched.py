"""`sched_tables` (flow-matching tables, lookups, add_noise, x0 conversion, step lists) and
`sched_noise_controller` (the motion-aware noise controller over a chunked pixel stream)."""

from __future__ import annotations

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.models.scheduler import (
    FlowMatchScheduler,
    chunk_motion,
    controlled_noise_scale,
    denoising_steps,
    warp_steps,
)


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    if case.kind == "sched_tables":
        _tables(case, report, options)
    elif case.kind == "sched_noise_controller":
        _controller(case, report, options)
    else:
        raise CaseError(f"sched family cannot run kind {case.kind!r}")


def _tables(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    ctor = case.manifest.get("scheduler_config", {}).get("ctor")
    if not isinstance(ctor, dict) or "shift" not in ctor or "num_train_timesteps" not in ctor:
        raise CaseError(f"{case.name}: scheduler_config.ctor must give shift and num_train_timesteps")
    # Our FlowMatchScheduler is the reference's with these settings; any other is not reproduced.
    fixed = {"sigma_min": 0.0, "sigma_max": 1.0, "extra_one_step": True, "inverse_timesteps": False}
    other = {k: ctor[k] for k, v in fixed.items() if k in ctor and ctor[k] != v}
    if other or ctor.get("reverse_sigmas", False):
        raise CaseError(f"{case.name}: unsupported scheduler settings {other or {'reverse_sigmas': True}}")
    sched = FlowMatchScheduler(
        shift=float(ctor["shift"]), num_train_timesteps=int(ctor["num_train_timesteps"])
    )
    bound = options.bound(1e-6)
    report.compare("outputs/sigmas", sched.sigmas, case.tensor("outputs/sigmas"), bound)
    report.compare("outputs/timesteps", sched.timesteps, case.tensor("outputs/timesteps"), bound)
    t = case.tensor("outputs/lookup_t")
    report.exact("outputs/lookup_id_add_noise", sched.index(t), case.tensor("outputs/lookup_id_add_noise"))
    report.exact("outputs/lookup_id_convert", sched.index_f64(t), case.tensor("outputs/lookup_id_convert"))
    report.compare("outputs/lookup_sigma", sched.sigma(t), case.tensor("outputs/lookup_sigma"), bound)
    report.exact(
        "host lookup == device lookup",
        [sched.sigma_of(float(v)) for v in t],
        [float(v) for v in sched.sigma(t)],
    )

    dev = options.device
    x0, noise = case.tensor("inputs/add_noise/x0").to(dev), case.tensor("inputs/add_noise/noise").to(dev)
    ts = case.tensor("inputs/add_noise/timestep").to(dev)
    report.compare(
        "outputs/add_noise", sched.add_noise(x0, noise, ts), case.tensor("outputs/add_noise"), bound
    )

    flow, xt = case.tensor("inputs/convert/flow_pred").to(dev), case.tensor("inputs/convert/xt").to(dev)
    tc = case.tensor("inputs/convert/timestep").to(dev)
    x0_pred = sched.flow_to_x0(flow, xt, tc)
    report.compare("outputs/convert/x0_pred", x0_pred, case.tensor("outputs/convert/x0_pred"), bound)
    back = sched.x0_to_flow(case.tensor("outputs/convert/x0_pred").to(dev), xt, tc)
    report.compare(
        "outputs/convert/flow_pred_roundtrip", back, case.tensor("outputs/convert/flow_pred_roundtrip"), bound
    )

    for i, entry in enumerate(case.manifest.get("denoising_step_lists", [])):
        merged = entry["merged_list"]
        steps = denoising_steps(entry["step"], base=merged, keep_final_zero=bool(entry["t2v"]))
        if entry["warp_denoising_step"]:
            steps = warp_steps(steps, sched) if not entry["t2v"] else [*warp_steps(steps[:-1], sched), 0.0]
        label = f"denoising_step_lists[{i}] step={entry['step']} t2v={entry['t2v']} warp={entry['warp_denoising_step']}"
        report.exact(label, [float(s) for s in steps], [float(s) for s in entry["result"]])


def _controller(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    video = case.tensor("inputs/video").to(options.device)
    initial = float(case.manifest["inputs"]["init_noise_scale"])
    chunk = int(case.manifest["inputs"]["chunk_size"])
    previous = initial
    scales, steps = [], []
    for call in case.manifest["calls"]:
        end = int(call["args"]["end_idx"])
        motion = float(chunk_motion(video[:, :, end - chunk - 1 : end]))
        scale, step = controlled_noise_scale(motion, previous, initial)
        previous = scale
        scales.append(scale)
        steps.append(step)
        expected = call["returns"]
        report.exact(f"end_idx={end} current_step", step, int(expected["current_step"]))
        ok = abs(scale - float(expected["noise_scale"])) <= 1e-6
        report.exact(f"end_idx={end} noise_scale within 1e-6", ok, True)
    report.compare(
        "outputs/noise_scale", torch.tensor(scales), case.tensor("outputs/noise_scale"), options.bound(1e-6)
    )
    report.exact("outputs/current_step", torch.tensor(steps), case.tensor("outputs/current_step"))
