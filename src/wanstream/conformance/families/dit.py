"""`dit_forward`: one official full-clip forward of the Wan DiT."""

from __future__ import annotations

from wanstream.conformance.case import CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.models.dit import WanConfig
from wanstream.weights.dit import load_dit


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    config = WanConfig.from_dict(case.manifest["model_config"])
    model = options.dit(
        load_dit(
            case.prefixed("weights/"), config, dtype=options.dtype, device=options.device, source=case.name
        )
    )
    bound = options.bound(case.tolerance("tolerance.suggested_rel_l2", default=1e-5))
    for call in case.manifest["calls"]:
        args = call["args"]
        dev = options.device
        x = [case.tensor(n).to(dev, options.dtype) for n in args["x"]]
        ctx = [case.tensor(n).to(dev, options.dtype) for n in args["context"]]
        out = model.forward_full(x, case.tensor(args["t"]).to(dev), ctx, seq_len=args.get("seq_len"))
        for ours, name in zip(out, call["returns"], strict=True):
            report.compare(name, ours, case.tensor(name), bound)
