#!/usr/bin/env python3
"""Measure what the reference itself achieves in bfloat16 on each golden case, against its own float32 run.

For every case of a folder (tests/golden), the reference module the case was recorded from is built from
the case's own weights and run twice on the case's own inputs, on the CPU: in float32, and in bfloat16 the
way the real pipeline runs it (module and inputs cast to bf16, the reference's internal float32 casts left
as they are). The rel-L2 of the bf16 outputs against the float32 outputs is what the reference achieves;
`src/wanstream/conformance/bf16_bounds.json` holds these numbers and derives our bf16 bounds from them
(`python -m wanstream.conformance --help` prints them).

End-to-end cases (`stream_v2v_end_to_end`) are measured by `record_stream_v2v.py --replay CASE`, which runs
the reference's whole CLI loop; this tool runs it for them.

    python tools/golden/reference_bf16.py --reference sdv2-c5a0f20.tar.gz --site /tmp/sdv2-site \\
        --golden tests/golden --write-bounds src/wanstream/conformance/bf16_bounds.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from record_stream_v2v import Reference, rel_l2

BF16 = torch.bfloat16
CHECK = "check_float32_run_vs_golden"  # the driver's float32 run reproduces the case (a driver self-check)
Measure = Callable[[Reference, Path, dict[str, Any], dict[str, torch.Tensor]], dict[str, float]]


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, list):
        return [_cast(v, dtype) for v in x]
    return x


def _worst(errors: dict[str, float], name: str, err: float) -> None:
    errors[name] = max(errors.get(name, 0.0), err)


# ---------------------------------------------------------------------------------------------------------
# Families


def dit_forward(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Wan2.1 `WanModel.forward` (StreamDiffusionV2's copy, models/wan/wan_base/modules/model.py)."""
    from models.wan.wan_base.modules.model import WanModel

    cfg = {k: v for k, v in man["model_config"].items()}
    model = WanModel(**cfg).eval()
    model.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("weights/")}, strict=True)
    errors: dict[str, float] = {}
    for call in man["calls"]:
        a = call["args"]
        outs = {}
        for dtype in (torch.float32, BF16):
            model.to(dtype)
            x = [t[n].to(dtype) for n in a["x"]]
            ctx = [t[n].to(dtype) for n in a["context"]]
            outs[dtype] = model(x, t=t[a["t"]], context=ctx, seq_len=a["seq_len"])
        for o32, o16, name in zip(outs[torch.float32], outs[BF16], call["returns"], strict=True):
            _worst(errors, "outputs", rel_l2(o16.float(), o32))
            _worst(errors, CHECK, rel_l2(o32, t[name]))
    return errors


def t5_encoder(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Wan2.1 umT5 `T5Encoder.forward` (models/wan/wan_base/modules/t5.py), bf16 like the loaded pipeline."""
    from models.wan.wan_base.modules.t5 import T5Encoder

    mc = man["model_config"]
    args = {
        k: mc[k] for k in ("vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets")
    }
    model = T5Encoder(**args, shared_pos=mc["shared_pos"], dropout=mc["dropout"]).eval()
    sd = torch.load(path.with_suffix(".pth"), map_location="cpu")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    outs = {}
    for dtype in (torch.float32, BF16):
        model.to(dtype)
        outs[dtype] = model(t["inputs/ids"], t["inputs/mask"])
    return {
        "outputs": rel_l2(outs[BF16].float(), outs[torch.float32]),
        CHECK: rel_l2(outs[torch.float32], t["outputs/encoder_out"]),
    }


def _wan_vae(man: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
    from models.wan.wan_base.modules.vae import WanVAE_

    model = WanVAE_(**man["model_config"]["constructor_args"]).eval()
    model.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("weights/")}, strict=True)
    return model


def vae_roundtrip(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """`WanVAE_.encode` (raw mu) and `WanVAE_.decode` of the golden latent, whole clip."""
    model = _wan_vae(man, t)
    video = t["inputs/video"]
    latent = t["outputs/encode_latent"]
    outs: dict[Any, Any] = {}
    for dtype in (torch.float32, BF16):
        model.to(dtype)
        scale = [t["inputs/scale_mean"].to(dtype), (1.0 / t["inputs/scale_std"]).to(dtype)]
        mu = model.encode(video.to(dtype), [0.0, 1.0])
        model.clear_cache()
        dec = model.decode(latent.to(dtype), scale)
        model.clear_cache()
        outs[dtype] = (mu, dec)
    return {
        "encode": rel_l2(outs[BF16][0].float(), outs[torch.float32][0]),
        "decode": rel_l2(outs[BF16][1].float(), outs[torch.float32][1]),
        CHECK: max(
            rel_l2(outs[torch.float32][0], t["outputs/encode_mu_raw"]),
            rel_l2(outs[torch.float32][1], t["outputs/decode_raw"]),
        ),
    }


def _slice(t: dict[str, torch.Tensor], spec: str) -> torch.Tensor:
    """`inputs/name[:, :, 5:9]` → the tensor sliced so."""
    name, _, rest = spec.partition("[")
    x = t[name]
    if not rest:
        return x
    index = []
    for part in rest.rstrip("]").split(","):
        part = part.strip()
        if part == ":":
            index.append(slice(None))
        else:
            lo, hi = part.split(":")
            index.append(slice(int(lo), int(hi)))
    return x[tuple(index)]


def vae_stream(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """`WanVAEWrapper.stream_encode` / `stream_decode_to_pixel` call by call, as the wrapper does them."""
    model = _wan_vae(man, t)
    mean, inv_std = t["inputs/scale_mean"], 1.0 / t["inputs/scale_std"]
    results: dict[Any, list[torch.Tensor]] = {}
    for dtype in (torch.float32, BF16):
        model.to(dtype)
        results[dtype] = []
        for call in man["calls"]:
            if call["first_call_of_session"]:
                model.first_encode = model.first_decode = True
            if call["call"].endswith("stream_encode"):
                out = model.stream_encode(_slice(t, call["args"]["video"]).to(dtype), None)
            else:
                zs = _slice(t, call["args"]["latent"]).permute(0, 2, 1, 3, 4).to(dtype)
                out = model.stream_decode(zs, [mean.to(dtype), inv_std.to(dtype)])
                out = out.float().clamp_(-1, 1).permute(0, 2, 1, 3, 4)
            results[dtype].append(out)
    errors: dict[str, float] = {}
    for call, o32, o16 in zip(man["calls"], results[torch.float32], results[BF16], strict=True):
        _worst(
            errors, "encode" if call["call"].endswith("stream_encode") else "decode", rel_l2(o16.float(), o32)
        )
        _worst(errors, CHECK, rel_l2(o32, t[call["output"]]))
    return errors


def causal_stream_calls(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """`CausalWanDiffusionWrapper` with the reference's KV cache, call by call, fed the recorded inputs.

    Each run keeps its own cache (bf16 in the bf16 run, as the pipeline allocates it); the recorded noisy
    input of every call is fed to both runs, so the error is the DiT + cache's own, not the loop's.
    """
    from models.wan.causal_model import CausalWanModel
    from models.wan.wan_wrapper import CausalWanDiffusionWrapper

    pc, mc = man["pipeline_config"], man["model_config"]
    gen = torch.load(path.with_suffix(".model.pt"), map_location="cpu")["generator"]
    accepted = inspect.signature(CausalWanModel.__init__).parameters
    cfg = {k: v for k, v in mc.items() if k in accepted}
    # The wrapper builds its models through from_pretrained(<1.3B folder>): build the case's tiny config.
    from models.wan.wan_base.modules.model import WanModel

    saved = WanModel.from_pretrained, CausalWanModel.from_pretrained
    WanModel.from_pretrained = classmethod(lambda cls, *a, **k: torch.nn.Identity())
    CausalWanModel.from_pretrained = classmethod(lambda cls, *a, **k: CausalWanModel(**cfg))
    try:
        wrapper = CausalWanDiffusionWrapper().eval()
    finally:
        WanModel.from_pretrained, CausalWanModel.from_pretrained = saved
    wrapper.load_state_dict(gen, strict=True)
    heads, head_dim = wrapper.model.num_heads, wrapper.model.dim // wrapper.model.num_heads
    flows: list[torch.Tensor] = []
    wrapper.model.register_forward_hook(lambda module, args, out: flows.append(out.float()))
    prepare_calls = set(man["chunks"][0]["calls"])
    lanes = int(pc.get("num_lanes", 1))
    prompt = t["inputs/prompt_embeds"]
    outputs: dict[Any, list[torch.Tensor]] = {}
    flow: dict[Any, list[torch.Tensor]] = {}
    for dtype in (torch.float32, BF16):
        wrapper.to(dtype)
        kv, cross = [], []
        for block in wrapper.model.blocks:
            block.self_attn.sink_size = int(pc["num_sink_tokens"])
            block.self_attn.adapt_sink_thr = float(pc["adapt_sink_threshold"])
            block.self_attn.evict_idx = None
            shape = [1, int(pc["kv_cache_length"]), heads, head_dim]
            kv.append(
                {
                    "k": torch.zeros(shape, dtype=dtype),
                    "v": torch.zeros(shape, dtype=dtype),
                    "global_end_index": torch.tensor([0]),
                    "local_end_index": torch.tensor([0]),
                    "total_steps": len(pc["denoising_step_list"]),
                    "current_step": len(pc["denoising_step_list"]),
                }
            )
            cross.append({"k": None, "v": None, "is_init": False})
        context = torch.zeros(1, int(mc["text_len"]), prompt.shape[-1], dtype=dtype)
        context[:, : prompt.shape[1]] = prompt.to(dtype)
        outputs[dtype] = []
        flows.clear()
        for call in man["calls"]:
            i = int(call["call"])
            if i not in prepare_calls and kv[0]["k"].shape[0] != lanes:  # prepare(batch_denoise) repeats
                for c in kv:
                    c["k"], c["v"] = c["k"].repeat(lanes, 1, 1, 1), c["v"].repeat(lanes, 1, 1, 1)
                    c["global_end_index"] = c["global_end_index"].repeat(lanes)
                    c["local_end_index"] = c["local_end_index"].repeat(lanes)
            x = t[f"calls/{i:03d}/noisy_input"].to(dtype)
            b = x.shape[0]
            for c in cross:
                if c["k"] is not None and c["k"].shape[0] != b:
                    c["k"], c["v"] = c["k"][:1].expand(b, -1, -1, -1), c["v"][:1].expand(b, -1, -1, -1)
            timestep = torch.tensor(call["timestep"], dtype=torch.int64).reshape(b, -1)
            out = wrapper(
                noisy_image_or_video=x,
                conditional_dict={"prompt_embeds": context.expand(b, -1, -1)},
                timestep=timestep,
                kv_cache=kv,
                crossattn_cache=cross,
                current_start=torch.tensor(call["current_start"]),
                current_end=torch.tensor(call["current_end"]),
            )
            outputs[dtype].append(out.float())
        flow[dtype] = list(flows)
    golden = [t[f"calls/{int(c['call']):03d}/output"] for c in man["calls"]]
    return {
        "outputs": max(rel_l2(a, b) for a, b in zip(outputs[BF16], outputs[torch.float32], strict=True)),
        "flow_pred": max(rel_l2(a, b) for a, b in zip(flow[BF16], flow[torch.float32], strict=True)),
        CHECK: max(rel_l2(a, b) for a, b in zip(outputs[torch.float32], golden, strict=True)),
    }


def tae_roundtrip(
    ref: Reference, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """TAEHV `encode_video` / `decode_video` and `TAEHVWanVAEWrapper.stream_decode_to_pixel`, at the case's
    reduced width (the recording's patch: every internal width passed by `TAEHV.__init__` divided)."""
    import models.wan.taehv_wrapper as tw

    div = int(man["model_config"]["width_divisor"])
    keep = {tw.TAEHV.image_channels, tw.TAEHV.latent_channels}

    def w(n: int) -> int:
        return n if n in keep else n // div

    saved = tw.conv, tw.MemBlock, tw.TPool, tw.TGrow
    orig_conv, orig_mem, orig_pool, orig_grow = saved

    class MemBlock(orig_mem):  # type: ignore[misc, valid-type]
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__(w(n_in), w(n_out))

    class TPool(orig_pool):  # type: ignore[misc, valid-type]
        def __init__(self, n_f: int, stride: int) -> None:
            super().__init__(w(n_f), stride)

    class TGrow(orig_grow):  # type: ignore[misc, valid-type]
        def __init__(self, n_f: int, stride: int) -> None:
            super().__init__(w(n_f), stride)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "taew2_1.pth"
        torch.save({k[8:]: v for k, v in t.items() if k.startswith("weights/")}, ckpt)

        def conv(n_in: int, n_out: int, **kwargs: Any) -> Any:
            if isinstance(sys._getframe(1).f_locals.get("self"), tw.TAEHV):  # TAEHV.__init__'s widths only
                n_in, n_out = w(n_in), w(n_out)
            return orig_conv(n_in, n_out, **kwargs)

        tw.conv, tw.MemBlock, tw.TPool, tw.TGrow = conv, MemBlock, TPool, TGrow
        try:
            model = tw.TAEHV(checkpoint_path=str(ckpt), **man["model_config"]["constructor_args"]).eval()
        finally:
            tw.conv, tw.MemBlock, tw.TPool, tw.TGrow = saved
    W = tw.TAEHVWanVAEWrapper
    results: dict[Any, list[torch.Tensor]] = {}
    for dtype in (torch.float32, BF16):
        model.to(dtype)
        state = types.SimpleNamespace(
            taehv=model,
            model=types.SimpleNamespace(first_decode=True),
            _decode_latent_cache=None,
            decode_context_latents=3,
            use_tensorrt=False,
            _tensorrt_decoder=None,
            _tensorrt_failed=False,
            parallel_decode=False,
        )
        state._decode_video = types.MethodType(W._decode_video, state)
        state._unit_range_to_pixels = types.MethodType(W._unit_range_to_pixels, state)
        session = None
        results[dtype] = []
        for call in man["calls"]:
            a = call["args"]
            if call["call"] == "TAEHV.encode_video":
                out = model.encode_video(t[a["x"]].to(dtype), parallel=a["parallel"], show_progress_bar=False)
            elif call["call"] == "TAEHV.decode_video":
                out = model.decode_video(t[a["x"]].to(dtype), parallel=a["parallel"], show_progress_bar=False)
            else:
                if a["session"] != session:
                    session, state.model.first_decode = a["session"], True
                out = W.stream_decode_to_pixel(state, _slice(t, a["latent"]).to(dtype))
            results[dtype].append(out.float())
    errors: dict[str, float] = {}
    for call, o32, o16 in zip(man["calls"], results[torch.float32], results[BF16], strict=True):
        _worst(errors, "encode" if "encode" in call["call"] else "decode", rel_l2(o16, o32))
        _worst(errors, CHECK, rel_l2(o32, t[call["output"]]))
    return errors


FAMILIES: dict[str, Measure] = {
    "dit_forward": dit_forward,
    "t5_encoder": t5_encoder,
    "vae_roundtrip": vae_roundtrip,
    "vae_stream": vae_stream,
    "causal_stream_calls": causal_stream_calls,
    "tae_roundtrip": tae_roundtrip,
}


FACTOR = 2.0  # ours may be this much worse than the reference's own bf16 (different but equivalent op order)
# Families whose cases are computed in float32 by the real bf16 pipeline too: the float32 bound applies.
FLOAT32_PATH = {
    "sched_tables": 1e-6,
    "sched_noise_controller": 1e-6,
}
CLASSES = {"stream_v2v_end_to_end": ("final_video", "intermediates")}  # others: one "default" class


def _round_up(x: float) -> float:
    """Two significant digits, rounded up."""
    exp = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**exp) * 10**exp


def bounds_file(measured: dict[str, Any]) -> dict[str, Any]:
    """bf16_bounds.json: the measurements per family and the bounds derived from them."""
    families: dict[str, Any] = {}
    for name, rec in sorted(measured.items()):
        fam = families.setdefault(rec["kind"], {"reference": {}})
        fam["reference"][name] = rec["reference_bfloat16_vs_float32_rel_l2"]
    for kind, fam in families.items():
        worst: dict[str, float] = {}
        for errors in fam["reference"].values():
            for cls, err in errors.items():
                if cls == CHECK:
                    continue
                key = cls if cls in CLASSES.get(kind, ()) else "default"
                worst[key] = max(worst.get(key, 0.0), err)
        fam["reference_worst"] = worst
        fam["bounds"] = {k: _round_up(FACTOR * v) for k, v in worst.items()}
    for kind, bound in FLOAT32_PATH.items():
        families[kind] = {
            "note": "computed in float32 by the bf16 pipeline too (reference and ours): the float32 bound",
            "reference_worst": {"default": 0.0},
            "bounds": {"default": bound},
        }
    return {
        "factor": FACTOR,
        "how": "reference_bfloat16_vs_float32_rel_l2: the reference module of each case run on the case's own "
        "inputs in bfloat16 (module and inputs cast the way the real pipeline casts them) against its own "
        "float32 run, CPU, torch " + torch.__version__ + "; stream_v2v cases: the reference's whole CLI loop "
        "in bf16 with the float32 run's random draws (record_stream_v2v.py --replay); causal cases: each DiT "
        "call fed the recorded input, each run keeping its own KV cache; VACE cases (tests/golden-vace): "
        "Daydream Scope's own VACE code, the stream cases through Scope's blocks over the whole stream with "
        "the float32 run's random draws (reference_bf16_vace.py). bounds = factor x reference_worst, "
        "rounded up to two digits. Written by tools/golden/reference_bf16.py and reference_bf16_vace.py "
        "--write-bounds (each merges its cases into the file).",
        "families": families,
    }


def measurements(data: dict[str, Any]) -> dict[str, Any]:
    """The per-case measurements held in a bf16_bounds.json, in the form `measure` returns them."""
    return {
        name: {"kind": kind, "reference_bfloat16_vs_float32_rel_l2": errors}
        for kind, fam in data["families"].items()
        for name, errors in fam.get("reference", {}).items()
    }


def write_bounds(path: Path, results: dict[str, Any]) -> None:
    """Merge `results` into the measurements already in `path` (other tools' cases stay) and rewrite it."""
    merged = measurements(json.loads(path.read_text())) if path.exists() else {}
    merged.update(results)
    path.write_text(json.dumps(bounds_file(merged), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--site", type=Path)
    p.add_argument("--golden", type=Path, default=Path("tests/golden"))
    p.add_argument("--only", help="only cases whose name contains this")
    p.add_argument("--json", type=Path, help="write {case: {kind, errors}} here")
    p.add_argument("--measured", type=Path, help="use these measurements (a --json file) instead of running")
    p.add_argument("--write-bounds", type=Path, help="merge the measurements into this bf16_bounds.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.measured:
        results = json.loads(args.measured.read_text())
    else:
        results = measure(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_bounds:
        write_bounds(args.write_bounds, results)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdv2-bf16-") as tmp:
        ref = Reference(args.reference, args.site, Path(tmp))
        for path in sorted(args.golden.glob("*.json")):
            man = json.loads(path.read_text())
            kind, name = man.get("kind"), path.stem
            if not kind or (args.only and args.only not in name):
                continue
            if kind == "stream_v2v_end_to_end":
                errors = _end_to_end(args, name)
            elif kind in FAMILIES:
                errors = FAMILIES[kind](ref, path, man, load_file(str(path.with_suffix(".safetensors"))))
            else:
                print(f"{name:<32} [{kind}] no bf16 driver")
                continue
            results[name] = {"kind": kind, "reference_bfloat16_vs_float32_rel_l2": errors}
            print(f"{name:<32} [{kind}] " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    return results


def _end_to_end(args: argparse.Namespace, name: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "record_stream_v2v.py"),
        "--reference",
        str(args.reference),
    ]
    cmd += ["--weights", str(args.golden), "--out", "/nonexistent", "--case", name, "--replay", name]
    if args.site:
        cmd += ["--site", str(args.site)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not last:
        raise SystemExit(
            f"{name}: the reference replay failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    errors = json.loads(last[-1])["reference_bfloat16_vs_float32_rel_l2"]
    return {"final_video": errors["final_video"], "intermediates": errors["dit_out_max"]}


if __name__ == "__main__":
    raise SystemExit(main())
