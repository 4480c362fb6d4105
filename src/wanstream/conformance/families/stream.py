"""`stream_v2v_end_to_end`: the whole single-GPU loop, through our `StreamSession`.

Video in (uint8), the recorded text conditioning and random draws, the real YAML settings; compare the
final video, every DiT call the reference made on real input (inputs, timesteps, positions, x0), every
chunk's noise-controller step, and which chunks were decoded. The reference loop is configured from what
the manifest says it ran (entry point → batching, `loop` / `loop_description` → whether and where RoPE
positions reset), never from what the shared cases happen to need. The reference's offline loops end with
flush iterations whose extra work (and draws) never reaches the video; our session drains exactly what it
must.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.engine.components import Components
from wanstream.engine.denoise.local import DiTCall
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


# The reference's single-GPU offline loops: module → our batching mode.
ENTRY_POINTS = {"streamv2v.inference": "stream", "streamv2v.inference_wo_batch": "none"}


def reference_loop(case: GoldenCase) -> tuple[str, int | None]:
    """(batching, RoPE reset frame or None) of the loop the case was recorded from, as its manifest says.

    The reset comes from the structured `loop.rope_reset_frame` when the manifest has it, else from the
    `loop_description` (the rule `current_start//fsl >= N`, or a statement that the loop has none); a
    manifest that says neither is an error rather than a guess.
    """
    man = case.manifest
    entry = str(man.get("reference", {}).get("entry_point", ""))
    found = re.search(r"streamv2v\.(inference_wo_batch|inference)\b", entry)
    if found is None or found[0] not in ENTRY_POINTS:
        raise CaseError(
            f"{case.name}: unknown reference entry point {entry!r} (known: {sorted(ENTRY_POINTS)})"
        )
    batching = ENTRY_POINTS[found[0]]
    loop: Any = man.get("loop")
    if isinstance(loop, dict) and "rope_reset_frame" in loop:
        frame = loop["rope_reset_frame"]
        return batching, None if frame is None else int(frame)
    text = str(man.get("loop_description", ""))
    rule = re.search(r"current_start\s*//\s*(?:fsl|frame_seq_length)\s*>=\s*(\d+)", text)
    if rule is not None:
        return batching, int(rule[1])
    if re.search(r"\bno (?:t_refresh )?(?:RoPE )?position reset", text, re.IGNORECASE):
        return batching, None
    raise CaseError(f"{case.name}: the manifest does not say whether the loop resets RoPE positions")


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
    dit = options.dit(
        load_dit(
            _file(case, ".model.pt"),
            WanConfig.from_json(_file(case, ".config.json")),
            dtype=dtype,
            device=dev,
        )
    )
    vae_cfg = WanVAEConfig.from_dict(man["models"]["vae"]["constructor_args"])
    vae = load_wan_vae(_file(case, "Wan2.1_VAE.pth"), vae_cfg, dtype=dtype, device=dev)
    components = Components(dit=dit, device=torch.device(dev), dtype=dtype, wan_vae=vae, label=case.name)

    batching, rope_reset_frame = reference_loop(case)
    steps = denoising_steps(int(cfg["step"]), base=cfg["denoising_step_list"])
    settings = StreamSettings(
        height=int(cfg["height"]),
        width=int(cfg["width"]),
        steps=tuple(steps),
        noise_scale=float(cfg["noise_scale"]),
        noise_controller=True,
        batching=batching,
        kv_cache_frames=int(cfg["num_kv_cache"]),
        sink_frames=int(cfg["num_sink_tokens"]),
        sink_threshold=float(cfg["adapt_sink_threshold"]),
        rope_reset_frame=rope_reset_frame,
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

    bound_video = options.bound(
        case.tolerance("precision.suggested_rel_l2_bound_final_video", default=5e-5), "final_video"
    )
    bound_mid = options.bound(
        case.tolerance("precision.suggested_rel_l2_bound_intermediates", default=2e-4), "intermediates"
    )
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
