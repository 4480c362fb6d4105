"""`causal_stream_calls`: the causal DiT + KV cache driven like the reference's live session API.

Drives `engine.denoise.local.Denoiser` chunk by chunk with the case's latents, noise and recorded re-noise
draws, and compares every DiT call (inputs, timesteps, positions, flow, x0), the cache bookkeeping after
each call (end indices, the eviction queue of every layer and lane), and the final cache contents.
"""

from __future__ import annotations

from typing import Any

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.engine.denoise.local import Denoiser, DiTCall
from wanstream.engine.rng import ReplayNoise
from wanstream.models.dit import WanConfig
from wanstream.models.kv_cache import KVCache, KVCacheConfig
from wanstream.models.scheduler import FlowMatchScheduler, chunk_motion, controlled_noise_scale
from wanstream.weights.dit import load_dit


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    man = case.manifest
    pc = man["pipeline_config"]
    dev, dtype = options.device, options.dtype
    config = WanConfig.from_dict(man["model_config"])
    dit = options.dit(
        load_dit(case.path(f"{case.manifest_path.stem}.model.pt"), config, dtype=dtype, device=dev)
    )
    L, C = int(pc["frame_seq_length"]), int(pc["kv_cache_length"])
    steps = [int(t) for t in pc["denoising_step_list"]]
    cache = KVCache(
        KVCacheConfig(
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            frame_tokens=L,
            num_frames=int(pc["num_kv_cache"]),
            num_sink=int(pc["num_sink_tokens"]),
            sink_threshold=float(pc["adapt_sink_threshold"]),
            lanes=int(pc.get("num_lanes", len(steps))),
        ),
        dtype=dtype,
        device=dev,
    )
    draws = [case.tensor(f"renoise/{e['draw']:03d}") for e in man.get("renoise_events", [])]
    rng = ReplayNoise(draws)
    denoiser = Denoiser(
        dit, FlowMatchScheduler(), cache, rng, steps, "stream" if pc["mode"] == "batch" else "none"
    )
    denoiser.reset()

    calls: list[tuple[DiTCall, list[dict[str, Any]]]] = []

    cache.sink_log = []
    sink_calls: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []

    def record(call: DiTCall) -> None:
        sink_calls.append(list(cache.sink_log or []))
        cache.sink_log.clear()
        # Snapshot the bookkeeping right after the call (reads device queues: fine in a test).
        lanes = range(len(call.starts))
        after = [
            {
                "global_end_index": [cache.bookkeeping(b)["global_end_index"] for b in lanes],
                "local_end_index": [cache.bookkeeping(b)["local_end_index"] for b in lanes],
                "evict_idx": [cache.queue_contents(layer, b) for b in lanes],
                "current_step": cache.host.current_step,
            }
            for layer in range(config.num_layers)
        ]
        calls.append((call, after))

    denoiser.on_call.append(record)
    cross = dit.cross_kv(case.tensor("inputs/prompt_embeds").to(dev, dtype))
    video = (
        case.tensor("inputs/pixel_video_for_controller").to(dev)
        if "inputs/pixel_video_for_controller" in case.tensors
        else None
    )
    init_scale = float(pc["init_noise_scale"])
    bound = options.bound(case.tolerance("tolerance.suggested_rel_l2", default=1e-5))
    if "t_refresh" not in pc:  # the session API's RoPE refresh frame: stated by the case, never assumed
        raise CaseError(f"{case.name}: pipeline_config has no t_refresh")
    t_refresh = int(pc["t_refresh"])

    prev_scale = init_scale
    start = 0
    for entry in man["chunks"]:
        k = int(entry["chunk"])
        latent = case.tensor(f"chunks/{k:03d}/latent").to(dev, dtype)
        noise = case.tensor(f"chunks/{k:03d}/noise").to(dev, dtype)
        if k == 0:
            scale = init_scale
            noisy = noise * scale + latent * (1 - scale)
            [done] = denoiser.first_chunk(noisy, start, cross, chunk=0)
            out = done.x0
            start += latent.shape[1] * L
        else:
            if start // L >= t_refresh:  # the session API's RoPE refresh
                start = C - L
            scale, first_step = float(entry["noise_scale"]), int(entry["current_step"])
            if video is not None:
                end = 1 + 4 * k + 4
                motion = float(chunk_motion(video[:, :, end - 5 : end]))
                ours_scale, ours_step = controlled_noise_scale(motion, prev_scale, init_scale)
                report.exact(f"chunk {k} current_step", ours_step, first_step)
                prev_scale = ours_scale
            report.exact(f"chunk {k} current_start", start, int(entry["current_start"]))
            noisy = noise * scale + latent * (1 - scale)
            finished = denoiser.chunk(noisy, start, first_step, cross, chunk=k)
            out = finished[0].x0 if finished else None  # stream batch: nothing while the lanes fill
            start += L
        name = f"chunks/{k:03d}/pipeline_return"
        if name in case.tensors:
            report.compare(name, out if out is not None else torch.zeros(0), case.tensor(name), bound)
        else:
            report.exact(f"chunk {k} has no output yet (warm-up)", out is None, True)

    report.exact("number of DiT calls", len(calls), len(man["calls"]))
    report.exact("every recorded random draw consumed", rng.remaining, 0)
    for (call, after), rec in zip(calls, man["calls"], strict=False):
        i = int(rec["call"])
        report.exact(
            f"calls/{i:03d} timestep",
            [t for t in call.timesteps for _ in range(call.frames)],
            rec["timestep"],
        )
        report.exact(f"calls/{i:03d} current_start", call.starts, rec["current_start"])
        report.compare(f"calls/{i:03d}/noisy_input", call.x, case.tensor(f"calls/{i:03d}/noisy_input"), bound)
        report.compare(
            f"calls/{i:03d}/flow_pred",
            call.flow.transpose(1, 2),
            case.tensor(f"calls/{i:03d}/flow_pred"),
            bound,
        )
        report.compare(f"calls/{i:03d}/output", call.x0, case.tensor(f"calls/{i:03d}/output"), bound)
        for layer, (ours, gold) in enumerate(zip(after, rec["cache_after"], strict=True)):
            for key in ("global_end_index", "local_end_index", "evict_idx", "current_step"):
                report.exact(f"calls/{i:03d} layer {layer} {key}", ours[key], gold[key])
    sink = man.get("adaptive_sink") or {}
    if "triggered" in sink:
        ours_triggers = [
            {"call": i, "layer": layer, "lane": lane, "argmin_slot": int(sim[lane].argmin())}
            for i, evaluations in enumerate(sink_calls)
            for layer, sim, fired in evaluations
            for lane in range(fired.shape[0])
            if bool(fired[lane])
        ]
        gold = [{k: t[k] for k in ("call", "layer", "lane", "argmin_slot")} for t in sink["triggered"]]
        report.exact("adaptive sink refreshes (call, layer, lane, slot)", ours_triggers, gold)
        n_eval = sum(fired.shape[0] for evaluations in sink_calls for _, _, fired in evaluations)
        if "n_evaluations" in sink:
            report.exact("adaptive sink evaluations", n_eval, int(sink["n_evaluations"]))
    # The cache's slots in order: in reduced precision a flipped sink decision (reported above) permutes them,
    # so they are their own class of bound where the precision has one (fp8; bf16 uses its default).
    cache_bound = options.bound(case.tolerance("tolerance.suggested_rel_l2", default=1e-5), "final_kv_cache")
    for layer in range(config.num_layers):
        for kv in ("k", "v"):
            name = f"final_kv_cache/{layer}/{kv}"
            if name in case.tensors:
                ours = getattr(cache, kv)[layer][: case.tensor(name).shape[0]]  # [lanes, tokens, H, D]
                report.compare(name, ours, case.tensor(name), cache_bound)
