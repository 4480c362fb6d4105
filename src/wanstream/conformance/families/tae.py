"""`tae_roundtrip`: TAEHV whole-clip encode/decode and StreamDiffusionV2's windowed streaming decode.

Calls are replayed in manifest order: `TAEHV.encode_video` / `TAEHV.decode_video` on their recorded inputs,
then `TAEHVWanVAEWrapper.stream_decode_to_pixel` on one `TAEWindowedDecodeState`, reset whenever the
call's `session` changes (the reference sets `first_decode = True` there).
"""

from __future__ import annotations

import re

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.models.tae import TAEHVConfig, TAEWindowedDecodeState
from wanstream.weights.tae import load_taehv

_SLICED = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<index>[^\]]*)\])?$")


def tensor_arg(case: GoldenCase, ref: str) -> torch.Tensor:
    """A tensor named in the manifest, optionally sliced like `inputs/stream_latents[:, 0:2]`."""
    match = _SLICED.match(ref.strip())
    if match is None:
        raise CaseError(f"{case.name}: cannot parse tensor reference {ref!r}")
    tensor = case.tensor(match["name"].strip())
    if match["index"] is None:
        return tensor
    index: list[slice | int] = []
    for part in match["index"].split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = [int(b) if b.strip() else None for b in part.split(":")]
                index.append(slice(*bounds))
            else:
                index.append(int(part))
        except (TypeError, ValueError):
            raise CaseError(f"{case.name}: cannot parse index {part!r} in {ref!r}") from None
    return tensor[tuple(index)]


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    man = case.manifest
    model_config = man["model_config"]
    config = TAEHVConfig.from_dict(model_config)
    model = load_taehv(
        case.prefixed("weights/"), config, dtype=options.dtype, device=options.device, source=case.name
    )
    expected_params = model_config.get("num_parameters")
    if expected_params is not None:
        report.exact("parameter count", sum(p.numel() for p in model.parameters()), int(expected_params))
    bound = options.bound(
        case.tolerance("precision.suggested_rel_l2_bound", "tolerance.suggested_rel_l2", default=2e-4)
    )
    context = int(man.get("decode_context_latents", model_config.get("decode_context_latents", 3)))
    state = TAEWindowedDecodeState(context_latents=context)
    session = None

    for call in man["calls"]:
        args, name = call["args"], call["call"]
        method = name.rsplit(".", 1)[-1]
        if method == "encode_video":
            x = tensor_arg(case, args["x"]).to(options.device, options.dtype)
            out = model.encode_video(x, parallel=bool(args.get("parallel", True)))
        elif method == "decode_video":
            x = tensor_arg(case, args["x"]).to(options.device, options.dtype)
            out = model.decode_video(x, parallel=bool(args.get("parallel", True)))
        elif method == "stream_decode_to_pixel":
            if args.get("session") != session:
                session = args.get("session")
                state.reset()
            z = tensor_arg(case, args["latent"]).to(options.device, options.dtype)
            # The reference wrapper decodes sequentially unless TensorRT is on (parallel_decode=False).
            out = model.stream_decode_windowed(z, state, parallel=bool(args.get("parallel", False)))
        else:
            raise CaseError(
                f"{case.name}: call {call.get('index')} is {name!r}, which this family does not know"
            )
        label = f"call{int(call['index']):02d} {method}"
        if "output_shape" in call:
            report.exact(f"{label} shape", list(out.shape), list(call["output_shape"]))
        report.compare(call["output"], out, case.tensor(call["output"]), bound)
