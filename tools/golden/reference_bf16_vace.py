#!/usr/bin/env python3
"""Measure what Daydream Scope itself achieves in bfloat16 on the VACE golden cases, against its own float32 run.

The sibling of `reference_bf16.py` for tests/golden-vace, whose cases were recorded from Scope
(daydreamlive/scope 68b0f95, `scope-src.tar.gz`). Each case is replayed by Scope's own code on the CPU
twice, in float32 and in bfloat16 the way `StreamDiffusionV2Pipeline` runs it: the generator (base
model + VACE blocks) cast to bf16 after loading, Scope's blocks casting their inputs to the generator's
or VAE's dtype themselves; prompt embeddings given in bf16 (what the pipeline's embedding blender hands
on). The float32 run's random draws are replayed in the bf16 run, cast to bf16 where Scope draws in bf16.

* `vace_blocks_forward`: `vace_encode_frames` / `vace_encode_masks` / `vace_latent` on the case's frames
  and mask (cast to bf16 as `VaceEncodingBlock` does), then one `WanDiffusionWrapper.forward` with a
  fresh KV cache; measured: the VAE pixels, `vace_context`, x / VACE tokens, hints, flow and x0.
* `vace_stream`, `vace_ref`: Scope's blocks over the whole stream, chunk by chunk (SetupCaches,
  PrepareLatents, VaceEncoding, Denoise, CleanKVCache, PrepareNext; the recording's driver), each run
  carrying its own KV cache and latents, so the error includes what the stream accumulates, as ours
  does (the conformance family replays the whole stream too); measured per DiT call: noisy input,
  hints, flow and x0, and per chunk the VAE pixels, `vace_context` and output latents.

The per-output errors of every case go to `src/wanstream/conformance/bf16_bounds.json` with `--write-bounds`
(the other families' measurements in that file are kept; bounds = factor x the family's worst, the rule of
`reference_bf16.py`).

What stands in for what Scope needs but this machine lacks (the recording's own runtime patches):
* `flash_attn` (imported unconditionally by wan2_1/modules/attention.py; with no FA3 and no SageAttention
  Scope's `attention()` is exactly `flash_attn_func(q, k, v)`): SDPA in the inputs' dtype, the stand-in of
  `baseline/scope/stubs/flash_attn`. On the measured path: it is the KV-cache and cross attention.
* `torch.compile(flex_attention, ...)` at the module level of streamdiffusionv2's causal_model.py: the eager
  `flex_attention` (same math; serves the VACE blocks' self-attention).
* `torchvision.transforms.functional.to_tensor` (only `load_and_prepare_reference_images`): uint8 HWC ->
  float CHW / 255, the same values.
* The VAE: the recording's stand-in VAE returned recorded latents; here the same latents are returned for
  each `encode_to_latent` call in order (in the call's dtype), and the pixels Scope handed over are kept.
Import-time only, not on the measured path: the package `__init__`s of scope, scope.core, core.pipelines,
streamdiffusionv2, wan2_1.blocks and wan2_1.components are replaced by bare namespaces (they import the app,
plugins, every pipeline and the text encoder); `kernels` is made unimportable (no hub download of FA3).
Scope needs diffusers (its modular-pipeline state and ModelMixin) and omegaconf: pass a folder holding
diffusers 0.36.0 (Scope's pin) and omegaconf 2.3.0 as --site, e.g.

    pip install --no-deps --target /tmp/scope-site diffusers==0.36.0 omegaconf==2.3.0 \\
        antlr4-python3-runtime==4.9.3 importlib_metadata zipp requests urllib3 idna charset_normalizer certifi
    python tools/golden/reference_bf16_vace.py --scope scope-src.tar.gz --site /tmp/scope-site \\
        --golden tests/golden-vace --write-bounds src/wanstream/conformance/bf16_bounds.json
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import importlib.machinery
import json
import sys
import tarfile
import tempfile
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from reference_bf16 import CHECK, write_bounds

BF16 = torch.bfloat16
PIPELINES = "scope.core.pipelines"
# Packages whose __init__ pulls in the app / every pipeline / the text encoder: bare namespaces instead.
BARE = [
    "scope",
    "scope.core",
    PIPELINES,
    f"{PIPELINES}.streamdiffusionv2",
    f"{PIPELINES}.wan2_1.blocks",
    f"{PIPELINES}.wan2_1.components",
]
BLOCKS = ["setup_caches", "prepare_latents", "denoise", "clean_kv_cache", "prepare_next"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def _flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
    """FlashAttention-2's `flash_attn_func(q, k, v)`: [B, L, H, D], full softmax, scale 1/sqrt(D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(255)


def _module(name: str) -> types.ModuleType:
    """A stand-in module that import probes (importlib.util.find_spec) can inspect."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


class Scope:
    """Scope's source unpacked and the modules the VACE cases use imported (see the docstring's stand-ins)."""

    def __init__(self, source: Path, site: Path | None, scratch: Path) -> None:
        if source.is_dir():
            src = source
        else:
            with tarfile.open(source) as tar:
                tar.extractall(scratch / "scope-src", filter="data")
            src = scratch / "scope-src"
        root = next(p.parent for p in src.rglob("causal_vace_model.py")).parents[5]  # holds scope/
        if site is not None:
            sys.path.insert(0, str(site))
        sys.path.insert(0, str(root))
        # diffusers (and transformers under it) probe optional packages at import: before any stand-in.
        for name in ("configuration_utils", "models.modeling_utils", "modular_pipelines.modular_pipeline"):
            importlib.import_module(f"diffusers.{name}")
        for name in BARE:
            module = types.ModuleType(name)
            module.__path__ = [str(root / name.replace(".", "/"))]
            sys.modules[name] = module
        flash_attn = _module("flash_attn")
        flash_attn.flash_attn_func = _flash_attn_func  # type: ignore[attr-defined]
        sys.modules["flash_attn"] = flash_attn
        sys.modules["kernels"] = None  # type: ignore[assignment]
        tv = [
            _module(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        ]
        tv[2].to_tensor = _to_tensor  # type: ignore[attr-defined]
        tv[0].transforms, tv[1].functional = tv[1], tv[2]  # type: ignore[attr-defined]
        for module in tv:
            sys.modules.setdefault(module.__name__, module)
        # the eager flex_attention is the stand-in (see the docstring): its "not compiled" warning is expected
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        compile_, print_ = torch.compile, builtins.print
        torch.compile = lambda fn=None, **kwargs: fn  # type: ignore[assignment]
        builtins.print = lambda *a, **k: None  # attention.py prints what it found at import
        try:
            self.causal = importlib.import_module(f"{PIPELINES}.streamdiffusionv2.modules.causal_model")
        finally:
            torch.compile, builtins.print = compile_, print_
        self.generator = importlib.import_module(f"{PIPELINES}.wan2_1.components.generator")
        self.mixin = importlib.import_module(f"{PIPELINES}.wan2_1.vace.mixin")
        self.vace_model = importlib.import_module(f"{PIPELINES}.wan2_1.vace.models.causal_vace_model")
        self.encoding = importlib.import_module(f"{PIPELINES}.wan2_1.vace.utils.encoding")
        self.vace_block = importlib.import_module(f"{PIPELINES}.wan2_1.vace.blocks.vace_encoding")
        self.utils = importlib.import_module(f"{PIPELINES}.wan2_1.utils")
        self.blocks = {b: importlib.import_module(f"{PIPELINES}.wan2_1.blocks.{b}") for b in BLOCKS}
        self.scratch = scratch

    def build(self, path: Path, man: dict[str, Any], dtype: torch.dtype) -> Any:
        """`WanDiffusionWrapper` + `_init_vace` as `StreamDiffusionV2Pipeline.__init__` does, then cast."""
        mc = man["model_config"]
        model_dir = self.scratch / path.stem
        (model_dir / "Wan2.1-T2V-1.3B").mkdir(parents=True, exist_ok=True)
        (model_dir / "Wan2.1-T2V-1.3B" / "config.json").write_text(json.dumps(mc))
        gen = self.generator.WanDiffusionWrapper(
            self.causal.CausalWanModel,
            model_dir=str(model_dir),
            generator_path=str(path.with_suffix(".model.pt")),
            generator_model_name="generator",
        )
        config = {
            "vace_path": str(path.with_suffix(".vace.safetensors")),
            "vace_in_dim": int(mc["vace_in_dim"]),
            "vace_layers": mc["vace_layers"],
        }
        gen.model = self.mixin.VACEEnabledPipeline()._init_vace(config, gen.model, device="cpu", dtype=dtype)
        return gen.to(device="cpu", dtype=dtype)


class StubVAE(torch.nn.Module):
    """Returns the case's recorded latents, one per `encode_to_latent` call, keeping the pixels it got."""

    def __init__(self, latents: list[torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)  # the VAE's dtype
        self.latents = latents
        self.pixels: list[torch.Tensor] = []
        self.use_cache: list[bool] = []

    def encode_to_latent(self, pixels: torch.Tensor, use_cache: bool = True, **_: Any) -> torch.Tensor:
        latent = self.latents[len(self.pixels)]  # [F, 16, h, w]
        self.pixels.append(pixels[0].float())
        self.use_cache.append(bool(use_cache))
        return latent[None].to(pixels.dtype)

    def clear_cache(self) -> None:
        pass

    def create_encoder_cache(self) -> None:
        return None


@contextmanager
def capture(scope: Scope, gen: Any) -> Iterator[dict[str, list[Any]]]:
    """Every generator call (noisy input, flow, x0), its hints and the x / VACE tokens, as float32."""
    seen: dict[str, list[Any]] = {"calls": [], "hints": [], "x_tokens": [], "vace_tokens": []}
    cls = scope.vace_model.CausalVaceWanModel
    forward_vace = cls.forward_vace

    def vace(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hints = forward_vace(self, x, *args, **kwargs)
        seen["x_tokens"].append(x.float())
        seen["hints"].append([h.float() for h in hints])
        return hints

    hook = gen.model.vace_patch_embedding.register_forward_hook(
        lambda m, a, out: seen["vace_tokens"].append(out.flatten(2).transpose(1, 2).float())
    )
    wrapper_forward = gen.forward

    def forward(noisy_image_or_video: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n_hints = len(seen["hints"])
        flow, x0 = wrapper_forward(noisy_image_or_video, *args, **kwargs)
        hints = seen["hints"][-1] if len(seen["hints"]) > n_hints else None
        seen["calls"].append((noisy_image_or_video.float(), flow.float(), x0.float(), hints))
        return flow, x0

    cls.forward_vace = vace
    gen.forward = forward
    try:
        yield seen
    finally:
        cls.forward_vace = forward_vace
        del gen.forward
        hook.remove()


def _worst(errors: dict[str, float], name: str, err: float) -> None:
    errors[name] = max(errors.get(name, 0.0), err)


def _compare(
    errors: dict[str, float], name: str, o16: torch.Tensor, o32: torch.Tensor, golden: torch.Tensor
) -> None:
    _worst(errors, name, rel_l2(o16, o32))
    _worst(errors, CHECK, rel_l2(o32, golden))


# ---------------------------------------------------------------------------------------------------------
# Families


def blocks_forward(
    scope: Scope, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]
) -> dict[str, float]:
    """`vace_encode_frames` / `vace_encode_masks` / `vace_latent`, then one `WanDiffusionWrapper.forward`."""
    call = next(c for c in man["calls"] if c["fn"].startswith("WanDiffusionWrapper.forward"))
    pc, args = man["pipeline_config"], call["args"]
    enc = scope.encoding
    runs: dict[torch.dtype, dict[str, Any]] = {}
    for dtype in (torch.float32, BF16):
        gen = scope.build(path, man, dtype)
        vae = StubVAE([t["intermediates/inactive_latent"], t["intermediates/reactive_latent"]], dtype)
        frames = t["inputs/vace_input_frames"][0].to(dtype)  # VaceEncodingBlock casts to the VAE's dtype
        masks = t["inputs/vace_input_masks"][0].to(dtype)
        z0 = enc.vace_encode_frames(vae, [frames], None, masks=[masks], pad_to_96=False)
        m0 = enc.vace_encode_masks([masks], None)
        context = enc.vace_latent(z0, m0)
        L, frames_cached = int(pc["frame_seq_length"]), int(pc["local_attn_size"])
        scope.blocks["setup_caches"].set_all_modules_frame_seq_length(gen, L)
        kv = scope.utils.initialize_kv_cache(
            generator=gen,
            batch_size=1,
            dtype=dtype,
            device="cpu",
            local_attn_size=frames_cached,
            frame_seq_length=L,
        )
        cross = scope.utils.initialize_crossattn_cache(generator=gen, batch_size=1, dtype=dtype, device="cpu")
        with capture(scope, gen) as seen:
            gen(
                noisy_image_or_video=t["inputs/noisy_input"].to(dtype),
                conditional_dict={"prompt_embeds": t["inputs/prompt_embeds"].to(dtype)},
                timestep=t["inputs/timestep"],
                kv_cache=kv,
                crossattn_cache=cross,
                current_start=int(args["current_start"]),
                current_end=int(args["current_end"]),
                vace_context=context,
                vace_context_scale=args["vace_context_scale"],
            )
        runs[dtype] = {
            "pixels": vae.pixels,
            "use_cache": vae.use_cache,
            "z0": z0[0].float(),
            "m0": m0[0].float(),
            "vace_context": context[0].float(),
            "seen": seen,
        }
    r32, r16 = runs[torch.float32], runs[BF16]
    encode = next(c for c in man["calls"] if c["fn"].startswith("vace_encode_frames"))
    recorded = [bool(rec["use_cache"]) for rec in encode["vae_calls"]]
    if r32["use_cache"] != recorded or r16["use_cache"] != recorded:
        raise SystemExit(
            f"{path.stem}: VAE use_cache {r32['use_cache']} / {r16['use_cache']}, case {recorded}"
        )
    errors: dict[str, float] = {}
    for name, p16, p32 in zip(("inactive", "reactive"), r16["pixels"], r32["pixels"], strict=True):
        _compare(errors, "vae_pixels", p16, p32, t[f"intermediates/{name}_pixels"])
    for name in ("z0", "m0", "vace_context"):
        golden = t["outputs/vace_context" if name == "vace_context" else f"intermediates/{name}"]
        _compare(errors, name, r16[name], r32[name], golden)
    s32, s16 = r32["seen"], r16["seen"]
    for name in ("x_tokens", "vace_tokens"):
        _compare(errors, name, s16[name][0], s32[name][0], t[f"intermediates/{name}"])
    (_, f32, x32, h32), (_, f16, x16, h16) = s32["calls"][0], s16["calls"][0]
    for n, (a, b) in enumerate(zip(h16, h32, strict=True)):
        _compare(errors, "hints", a, b, t[f"outputs/hints/{n}"])
    _compare(errors, "flow_pred", f16, f32, t["outputs/flow_pred"])
    _compare(errors, "output", x16, x32, t["outputs/output"])
    return errors


class Draws:
    """The case's random draws replayed in order through `torch.randn` of Scope's block modules."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws, self.taken = draws, 0

    def randn(self, *size: Any, dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        draw = self.draws[self.taken]
        if tuple(draw.shape) != shape:
            raise SystemExit(
                f"random draw {self.taken}: Scope asked for {shape}, the case has {tuple(draw.shape)}"
            )
        self.taken += 1
        return draw.to(dtype or torch.float32)


def _write_png(path: Path, rgb01: torch.Tensor) -> None:
    """[3, H, W] in [0, 1] -> 8-bit PNG of round(x * 255), as the recording wrote it."""
    from PIL import Image

    array = (rgb01.double() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array, "RGB").save(path)


def _stream_run(
    scope: Scope, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, Any]:
    """Scope's blocks over every chunk of the case (the recording's driver), in `dtype`."""
    from diffusers.modular_pipelines import PipelineState

    pc = man["pipeline_config"]
    gen = scope.build(path, man, dtype)
    latents = [
        t[f"chunks/{c['chunk']}/vae/{j}/latent"]
        for c in man["chunks"]
        for j, rec in enumerate(c["vae_calls"])
        if rec.get("op") == "encode_to_latent"
    ]
    vae = StubVAE(latents, dtype)
    config = types.SimpleNamespace(**{k: v for k, v in pc.items()}, device=torch.device("cpu"), dtype=dtype)
    components = types.SimpleNamespace(config=config, generator=gen, scheduler=gen.get_scheduler(), vae=vae)
    blocks = [
        scope.blocks["setup_caches"].SetupCachesBlock(),
        scope.blocks["prepare_latents"].PrepareLatentsBlock(),
        scope.vace_block.VaceEncodingBlock(),
        scope.blocks["denoise"].DenoiseBlock(),
        scope.blocks["clean_kv_cache"].CleanKVCacheBlock(),
        scope.blocks["prepare_next"].PrepareNextBlock(),
    ]
    draws = Draws([t[k] for k in sorted(n for n in t if n.startswith("random_draws/"))])
    state = PipelineState()
    for key, value in {
        "current_start_frame": 0,
        "manage_cache": True,
        "kv_cache_attention_bias": 1.0,
        "height": int(pc["height"]),
        "width": int(pc["width"]),
        "base_seed": int(man["base_seed"]),
        "conditioning_embeds": t["inputs/prompt_embeds"].to(dtype),
        "conditioning_embeds_updated": False,
        "current_denoising_step_list": torch.tensor(man["denoising_step_list"], dtype=torch.long),
        "noise_scale": None,
    }.items():
        state.set(key, value)
    contexts, outputs = [], []
    saved = [(m, m.torch) for m in (scope.blocks["prepare_latents"], scope.blocks["denoise"])]
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.randn = draws.randn  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="scope-vace-png-") as tmp, capture(scope, gen) as seen:
        for module, _ in saved:
            module.torch = proxy
        try:
            for chunk in man["chunks"]:
                k = int(chunk["chunk"])
                png = Path(tmp) / f"image_{k}.png"
                if f"chunks/{k}/ref_image_rgb01" in t:
                    _write_png(png, t[f"chunks/{k}/ref_image_rgb01"])
                parts = set(str(chunk.get("mode") or "none").split("+"))
                frames, masks = f"chunks/{k}/vace_input_frames", f"chunks/{k}/vace_input_masks"
                state.set("init_cache", k == 0)
                state.set("vace_input_frames", t.get(frames))
                state.set("vace_input_masks", t.get(masks))
                state.set("vace_ref_images", [str(png)] if parts & {"r2v", "refs"} else None)
                state.set("first_frame_image", str(png) if "extension:firstframe" in parts else None)
                state.set("last_frame_image", str(png) if "extension:lastframe" in parts else None)
                state.set("vace_context_scale", chunk.get("vace_context_scale"))
                for i, block in enumerate(blocks):
                    _, state = block(components, state)
                    if i == 2:
                        ctx = state.get("vace_context")
                        contexts.append(None if ctx is None else ctx[0].float())
                outputs.append(state.get("latents").float())
        finally:
            for module, original in saved:
                module.torch = original
    if draws.taken != len(draws.draws):
        raise SystemExit(f"{path.stem}: {draws.taken} of {len(draws.draws)} random draws used")
    recorded = [
        bool(rec["use_cache"])
        for c in man["chunks"]
        for rec in c["vae_calls"]
        if rec.get("op") == "encode_to_latent"
    ]
    if vae.use_cache != recorded:
        raise SystemExit(f"{path.stem}: VAE use_cache {vae.use_cache}, the case has {recorded}")
    return {"calls": seen["calls"], "contexts": contexts, "outputs": outputs, "pixels": vae.pixels}


def stream(scope: Scope, path: Path, man: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, float]:
    r32, r16 = (_stream_run(scope, path, man, t, dtype) for dtype in (torch.float32, BF16))
    errors: dict[str, float] = {}
    if len(r32["calls"]) != len(man["calls"]) or len(r16["calls"]) != len(man["calls"]):
        raise SystemExit(
            f"{path.stem}: {len(r32['calls'])} / {len(r16['calls'])} calls, the case has {len(man['calls'])}"
        )
    for rec, c32, c16 in zip(man["calls"], r32["calls"], r16["calls"], strict=True):
        p = f"calls/{int(rec['call']):03d}"
        for name, a, b in zip(("noisy_input", "flow_pred", "output"), c16[:3], c32[:3], strict=True):
            _compare(errors, name, a, b, t[f"{p}/{name}"])
        if bool(rec["has_vace_context"]) != (c32[3] is not None) or (c32[3] is None) != (c16[3] is None):
            raise SystemExit(f"{path.stem}: {p} has VACE hints in one run and not the other / the case")
        for n, (a, b) in enumerate(zip(c16[3] or [], c32[3] or [], strict=True)):
            _compare(errors, "hints", a, b, t[f"{p}/hints/{n}"])
    encodes = [
        f"chunks/{c['chunk']}/vae/{j}"
        for c in man["chunks"]
        for j, rec in enumerate(c["vae_calls"])
        if rec.get("op") == "encode_to_latent"
    ]
    for name, a, b in zip(encodes, r16["pixels"], r32["pixels"], strict=True):
        golden = t.get(f"{name}/pixel")
        _worst(errors, "vae_pixels", rel_l2(a, b))
        if golden is not None:
            _worst(errors, CHECK, rel_l2(b, golden))
    for chunk, a, b, o16, o32 in zip(
        man["chunks"], r16["contexts"], r32["contexts"], r16["outputs"], r32["outputs"], strict=True
    ):
        k = int(chunk["chunk"])
        if (a is None) != (chunk["vace_context_shape"] is None):
            raise SystemExit(f"{path.stem}: chunk {k} vace_context differs from the case's")
        if a is not None:
            _compare(errors, "vace_context", a, b, t[f"chunks/{k}/vace_context"])
        _compare(errors, "output_latents", o16, o32, t[f"chunks/{k}/output_latents"])
    return errors


FAMILIES = {"vace_blocks_forward": blocks_forward, "vace_stream": stream, "vace_ref": stream}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scope-bf16-") as tmp:
        scope = Scope(args.scope, args.site, Path(tmp))
        for path in sorted(args.golden.glob("*.json")):
            man = json.loads(path.read_text())
            kind, name = man.get("kind"), path.stem
            if kind not in FAMILIES or (args.only and args.only not in name):
                continue
            errors = FAMILIES[kind](scope, path, man, load_file(str(path.with_suffix(".safetensors"))))
            results[name] = {"kind": kind, "reference_bfloat16_vs_float32_rel_l2": errors}
            print(f"{name:<24} [{kind}] " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scope", type=Path, required=True, help="scope-src.tar.gz (or its unpacked folder)")
    p.add_argument("--site", type=Path, help="a folder holding diffusers and omegaconf")
    p.add_argument("--golden", type=Path, default=Path("tests/golden-vace"))
    p.add_argument("--only", help="only cases whose name contains this")
    p.add_argument("--json", type=Path, help="write {case: {kind, errors}} here")
    p.add_argument("--measured", type=Path, help="use these measurements (a --json file) instead of running")
    p.add_argument("--write-bounds", type=Path, help="merge the measurements into this bf16_bounds.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    results = json.loads(args.measured.read_text()) if args.measured else measure(args)
    bad = {
        n: r for n, r in results.items() if r["reference_bfloat16_vs_float32_rel_l2"].get(CHECK, 0) >= 1e-5
    }
    if bad:
        raise SystemExit(f"the float32 runs do not reproduce the cases: {sorted(bad)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_bounds:
        write_bounds(args.write_bounds, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
