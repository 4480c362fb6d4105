"""`vae_roundtrip` (official whole-clip encode/decode) and `vae_stream` (StreamDiffusionV2's streaming calls).

Where the reference silently drops frames our API refuses (a clip of 1 + 4k + r frames, a later stream chunk
that is not a multiple of 4), this family trims the recorded input the way the reference does before calling.
"""

from __future__ import annotations

import re

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.models.vae import VAEDecodeState, VAEEncodeState, WanVAE, WanVAEConfig
from wanstream.weights.vae import load_wan_vae


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    args = dict(case.manifest["model_config"]["constructor_args"])
    args["latent_mean"] = case.tensor("inputs/scale_mean").tolist()
    args["latent_std"] = case.tensor("inputs/scale_std").tolist()
    try:
        config = WanVAEConfig.from_dict(args)
    except ValueError as exc:
        raise CaseError(f"{case.name}: unsupported model_config: {exc}") from exc
    vae = load_wan_vae(
        case.prefixed("weights/"), config, dtype=options.dtype, device=options.device, source=case.name
    )
    bound = options.bound(case.tolerance("precision.suggested_rel_l2_bound", default=2e-4))
    if case.kind == "vae_roundtrip":
        _roundtrip(case, report, options, vae, bound)
    elif case.kind == "vae_stream":
        _stream(case, report, options, vae, bound)
    else:
        raise CaseError(f"vae family cannot run kind {case.kind!r}")


def _roundtrip(case: GoldenCase, report: CaseReport, options: RunOptions, vae: WanVAE, bound: float) -> None:
    video = _input(case, "inputs/video", options)
    n = vae.config.time_stride
    video = video[:, :, : 1 + (video.shape[2] - 1) // n * n]  # the reference encodes 1 + n·⌊(T−1)/n⌋ frames
    mu = None
    for call in case.manifest["calls"]:
        text = call["call"]
        name = call["recorded_as"].split()[0]
        if ".encode(" in text:
            mu = vae.encode(video) if mu is None else mu
            if text.startswith("WanVAE.encode("):  # the official wrapper normalises
                ours = vae.normalize(mu)
            elif text.startswith("WanVAE_.encode(") and "[0.0, 1.0]" in text:  # scale (0, 1): raw μ
                ours = mu
            else:
                raise CaseError(f"{case.name}: unsupported encode call {text!r}")
        elif text.startswith(("WanVAE.decode(", "WanVAE_.decode(")):
            # WanVAE.decode clamps; WanVAE_.decode (the model itself) does not. Both de-normalise.
            latent = re.match(r"\w+\.decode\(\[?(\w+)", text)
            if latent is None:
                raise CaseError(f"{case.name}: cannot tell which latents {text!r} decodes")
            z = _input(case, f"outputs/{latent[1]}", options)
            ours = vae.decode(z, clamp=text.startswith("WanVAE."))
        else:
            raise CaseError(f"{case.name}: unsupported call {text!r}")
        report.compare(name, ours, case.tensor(name), bound)


def _stream(case: GoldenCase, report: CaseReport, options: RunOptions, vae: WanVAE, bound: float) -> None:
    encode_state, decode_state = VAEEncodeState(), VAEDecodeState()
    session = None
    n = vae.config.time_stride
    for call in case.manifest["calls"]:
        if (
            call["session"] != session
        ):  # the pipeline's reset_stream_state: first_encode = first_decode = True
            encode_state.reset()
            decode_state.reset()
            session = call["session"]
        name, kind = call["output"], call["call"].rsplit(".", 1)[-1]
        state = encode_state if kind == "stream_encode" else decode_state
        if "first_call_of_session" in call:
            report.exact(
                f"{name} first call of its session", not state.started, call["first_call_of_session"]
            )
        if kind == "stream_encode":
            video = _input(case, call["args"]["video"], options)
            if encode_state.started:
                video = video[
                    :, :, : video.shape[2] // n * n
                ]  # the reference drops frames past a multiple of n
            ours = vae.stream_encode(video, encode_state)
            if call["args"].get("is_scale", False):
                ours = vae.normalize(ours)
        elif kind == "stream_decode_to_pixel":
            latent = _input(case, call["args"]["latent"], options)  # [B, T, C, h, w]
            ours = vae.stream_decode(latent.permute(0, 2, 1, 3, 4), decode_state).permute(0, 2, 1, 3, 4)
        else:
            raise CaseError(f"{case.name}: unsupported call {call['call']!r}")
        report.compare(name, ours, case.tensor(name), bound)


def _input(case: GoldenCase, spec: str, options: RunOptions) -> torch.Tensor:
    """A recorded tensor, optionally sliced as the manifest writes it: `inputs/video_session0[:, :, 5:9]`."""
    m = re.fullmatch(r"\s*([\w/.-]+)\s*(?:\[(.*)\])?\s*", spec)
    if m is None:
        raise CaseError(f"{case.name}: cannot read the argument {spec!r}")
    tensor = case.tensor(m[1])
    if m[2]:
        tensor = tensor[tuple(_index(part, spec, case) for part in m[2].split(","))]
    return tensor.to(options.device, options.dtype)


def _index(part: str, spec: str, case: GoldenCase) -> slice | int:
    bounds = [p.strip() for p in part.split(":")]
    try:
        if len(bounds) == 1:
            return int(bounds[0])
        if len(bounds) == 2:
            return slice(*(int(b) if b else None for b in bounds))
    except ValueError:
        pass
    raise CaseError(f"{case.name}: cannot read the index {part!r} in {spec!r}")
