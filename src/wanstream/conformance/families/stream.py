"""`stream_v2v_end_to_end`: the whole single-GPU loop, through our `StreamSession`.

Video in (uint8), the recorded text conditioning and random draws, the real YAML settings; compare the
final video, every DiT call the reference made on real input (inputs, timesteps, positions, x0), every
chunk's noise-controller step, and which chunks were decoded. The reference's offline loop has no RoPE
reset and ends with flush iterations whose extra work (and draws) never reaches the video; our session
drains exactly what it must.
"""

from __future__ import annotations

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.engine.batching import DiTCall
from wanstream.engine.components import Components
from wanstream.engine.rng import ReplayNoise
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.models.dit import WanConfig
from wanstream.models.scheduler import denoising_steps
from wanstream.models.vae import WanVAEConfig
from wanstream.weights.dit import load_dit
from wanstream.weights.vae import load_wan_vae


def _file(case: GoldenCase, suffix: str) -> str:
    for name in case.manifest.get("weights", {}).get("files", {}):
        if name.endswith(suffix):
            return str(case.path(name))
    raise CaseError(f"{case.name}: no weights file ending in {suffix!r} in the manifest")


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    man, cfg = case.manifest, case.manifest["resolved_config"]
    dev, dtype = options.device, options.dtype
    if (
        cfg.get("t2v")
        or cfg.get("use_taehv")
        or cfg.get("target_fps")
        or int(cfg.get("num_frame_per_block", 1)) != 1
    ):
        raise CaseError(
            f"{case.name}: unsupported reference options (t2v / TAEHV / target_fps / frames per block)"
        )
    dit = load_dit(
        _file(case, ".model.pt"), WanConfig.from_json(_file(case, ".config.json")), dtype=dtype, device=dev
    )
    vae_cfg = WanVAEConfig.from_dict(man["models"]["vae"]["constructor_args"])
    vae = load_wan_vae(_file(case, "Wan2.1_VAE.pth"), vae_cfg, dtype=dtype, device=dev)
    components = Components(dit=dit, device=torch.device(dev), dtype=dtype, wan_vae=vae, label=case.name)

    no_batch = "inference_wo_batch" in man["reference"]["entry_point"]
    steps = denoising_steps(int(cfg["step"]), base=cfg["denoising_step_list"])
    settings = StreamSettings(
        height=int(cfg["height"]),
        width=int(cfg["width"]),
        steps=tuple(steps),
        noise_scale=float(cfg["noise_scale"]),
        noise_controller=True,
        batching="none" if no_batch else "stream",
        kv_cache_frames=int(cfg["num_kv_cache"]),
        sink_frames=int(cfg["num_sink_tokens"]),
        sink_threshold=float(cfg["adapt_sink_threshold"]),
        rope_reset_frame=None,  # the offline loop (`run_inference`) never resets RoPE positions
    )
    draws = [case.tensor(d["tensor"]) for d in man["random_draws"]]
    session = StreamSession(components, settings, noise=ReplayNoise(draws), output="float")
    calls: list[DiTCall] = []
    session.denoiser.on_call.append(calls.append)
    session.set_prompt_embeddings(case.tensor("inputs/prompt_embeds").to(dev, dtype))

    video = case.tensor("inputs/video_uint8")[0].permute(1, 2, 3, 0)  # [T, H, W, 3] uint8
    num_chunks = (video.shape[0] - 1) // 4
    video = video[: 1 + 4 * num_chunks]  # frames past the last whole chunk are never read
    out = torch.cat([session.push(video), session.flush()])

    bound_video = options.bound(case.tolerance("precision.suggested_rel_l2_bound_final_video", default=5e-5))
    bound_mid = options.bound(case.tolerance("precision.suggested_rel_l2_bound_intermediates", default=2e-4))
    report.compare("outputs/final_video", out, case.tensor("outputs/final_video"), bound_video)

    # The noise controller's steps, chunk by chunk (they must match exactly).
    events = {e.chunk: e for e in session.events if e.kind == "input"}
    for chunk in man["chunks"]:
        k = int(chunk["chunk"])
        if "current_step" in chunk and k in events:
            report.exact(f"chunk {k} current_step", events[k].timesteps[0], int(chunk["current_step"]))
        if "output_frames" in chunk and k in events:
            report.exact(
                f"chunk {k} output frames", list(events[k].output_frames or ()), chunk["output_frames"]
            )

    # Every DiT call the reference made while real chunks were still in flight, in order.
    golden_calls = [e for e in man["events"] if e["kind"] == "dit"]
    report.exact(
        "DiT calls reproduced (the reference makes extra discarded flush calls)",
        len(calls) <= len(golden_calls),
        True,
    )
    for i, (ours, gold) in enumerate(zip(calls, golden_calls, strict=False)):
        report.exact(
            f"dit call {i} timesteps",
            [t for t in ours.timesteps for _ in range(ours.frames)],
            [t for row in gold["timestep"] for t in row],
        )
        report.exact(f"dit call {i} current_start", ours.starts, gold["current_start"])
        report.compare(f"{gold['x']} (call {i})", ours.x, case.tensor(gold["x"]), bound_mid)
        report.compare(f"{gold['out']} (call {i})", ours.x0, case.tensor(gold["out"]), bound_mid)
