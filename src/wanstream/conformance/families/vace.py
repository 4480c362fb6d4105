"""`vace_blocks_forward`, `vace_stream`, `vace_ref`: VACE against Daydream Scope's CausalVaceWanModel.

Weights go through `load_dit` (`<case>.model.pt`) and `load_vace` (`<case>.vace.safetensors`). The cases
record Scope's VAE encodes (a stand-in VAE): our conditioner's encoder is replaced by one that returns
the recorded latents, after checking that it was handed the recorded (or, where Scope built them from
the inputs, the expected) pixels with the recorded cache use. Everything else is ours:

* `vace_blocks_forward`: the 96-channel assembly (`masked_latents`, `mask_channels`, `vace_context`)
  from the case's frames and mask, then one DiT call with `VaceExtension` (fresh cache, start 0):
  tokens, VACE tokens, every hint, flow and x0.
* `vace_stream` / `vace_ref`: the whole stream through `StreamSession` in text mode with Scope's
  settings and a `VaceConditioner` fed per chunk as the case's chunks say (control frames + masks,
  reference / first-frame PNGs written from the recorded pixels, the scale); every DiT call (order,
  timesteps, positions, cache indices, inputs, hints, flow, x0), every context and random draw.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.engine.components import Components
from wanstream.engine.denoise.local import DiTCall
from wanstream.engine.rng import ReplayNoise
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import VaceConditioner, mask_channels, masked_latents, vace_context
from wanstream.media.images import read_image
from wanstream.models.dit import WanConfig
from wanstream.models.kv_cache import KVCache, KVCacheConfig
from wanstream.models.scheduler import FlowMatchScheduler
from wanstream.models.vace import VaceExtension, VaceModule
from wanstream.models.vae import VAEEncodeState, WanVAE, WanVAEConfig
from wanstream.weights.dit import load_dit
from wanstream.weights.vace import load_vace

DEFAULT_BOUND = 5e-5


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    if case.kind == "vace_blocks_forward":
        _blocks_forward(case, report, options)
    else:
        _stream(case, report, options)


def _models(case: GoldenCase, options: RunOptions) -> tuple[Any, VaceModule, WanConfig]:
    mc = case.manifest["model_config"]
    config = WanConfig.from_dict(mc)
    if int(mc.get("vace_in_dim", 96)) != 96:
        raise CaseError(f"{case.name}: vace_in_dim {mc['vace_in_dim']} (only 96 exists)")
    stem = case.manifest_path.stem
    dit = options.dit(
        load_dit(case.path(f"{stem}.model.pt"), config, dtype=options.dtype, device=options.device)
    )
    vace = load_vace(
        case.path(f"{stem}.vace.safetensors"),
        dit,
        vace_layers=mc.get("vace_layers"),
        dtype=options.dtype,
        device=options.device,
    )
    return dit, vace, config


def _bound(case: GoldenCase, options: RunOptions) -> float:
    return options.bound(case.tolerance("precision.suggested_rel_l2", default=DEFAULT_BOUND))


# ------------------------------------------------------------------------------------------------
# The recorded VAE
# ------------------------------------------------------------------------------------------------
@dataclass
class _Encode:
    name: str  # e.g. "chunks/3/vae/1"
    latent: torch.Tensor  # [1, 16, F, h, w]
    use_cache: bool
    in_shape: list[int] | None
    pixel: torch.Tensor | None  # what Scope passed [3, T, H, W], when the case records or implies it


class _RecordedEncoder:
    """Stands in for Scope's stand-in VAE: returns the recorded latents in order, keeping what it got."""

    def __init__(self, expected: list[_Encode]) -> None:
        self.expected = expected
        self.got: list[tuple[_Encode, torch.Tensor, bool]] = []

    def __call__(self, pixels: torch.Tensor, state: VAEEncodeState | None) -> torch.Tensor:
        if len(self.got) >= len(self.expected):
            raise CaseError(
                f"encode call {len(self.got)} was not recorded (the case has {len(self.expected)})"
            )
        entry = self.expected[len(self.got)]
        self.got.append((entry, pixels.detach().clone(), state is not None))
        return entry.latent.to(pixels.device, pixels.dtype)

    def check(self, report: CaseReport, bound: float) -> None:
        report.exact("VAE encode calls", len(self.got), len(self.expected))
        for entry, pixels, cached in self.got:
            report.exact(f"{entry.name} use_cache", cached, entry.use_cache)
            if entry.in_shape is not None:
                report.exact(f"{entry.name} input shape", list(pixels.shape), entry.in_shape)
            if entry.pixel is not None:
                report.compare(f"{entry.name}/pixel", pixels[0], entry.pixel, bound)


def _latent(t: torch.Tensor) -> torch.Tensor:
    """A recorded latent [F, 16, h, w] (Scope's encode_to_latent layout) → ours [1, 16, F, h, w]."""
    return t.transpose(0, 1)[None]


# ------------------------------------------------------------------------------------------------
# One generator call
# ------------------------------------------------------------------------------------------------
def _blocks_forward(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    man, dev, dtype = case.manifest, options.device, options.dtype
    bound = _bound(case, options)
    dit, vace, config = _models(case, options)
    call = next(c for c in man["calls"] if c["fn"].startswith("WanDiffusionWrapper.forward"))
    encode_call = next(c for c in man["calls"] if c["fn"].startswith("vace_encode_frames"))

    frames = case.tensor("inputs/vace_input_frames")[0].to(dev, dtype)  # [3, T, H, W]
    masks = case.tensor("inputs/vace_input_masks")[0].to(dev, dtype)  # [1, T, H, W]
    vae_calls = encode_call["vae_calls"]
    expected = [
        _Encode(
            f"intermediates/{stream}",
            _latent(case.tensor(f"intermediates/{stream}_latent")),
            bool(rec["use_cache"]),
            list(rec["in_shape"]),
            case.tensor(f"intermediates/{stream}_pixels"),
        )
        for stream, rec in zip(("inactive", "reactive"), vae_calls, strict=True)
    ]
    encoder = _RecordedEncoder(expected)

    def encode(pixels: torch.Tensor, stream: str | None) -> torch.Tensor:
        return encoder(pixels, None if stream is None else VAEEncodeState())

    z0 = masked_latents(frames, masks, encode)
    m0 = mask_channels(masks)
    context = vace_context(z0, m0)
    encoder.check(report, bound)
    report.compare("intermediates/z0", z0, case.tensor("intermediates/z0"), bound)
    report.compare("intermediates/m0", m0, case.tensor("intermediates/m0"), bound)
    report.compare("outputs/vace_context", context, case.tensor("outputs/vace_context"), bound)

    args = call["args"]
    x = case.tensor("inputs/noisy_input").to(dev, dtype)
    t = case.tensor("inputs/timestep").to(dev)
    F_lat = x.shape[1]
    pc = man["pipeline_config"]
    L = int(pc["frame_seq_length"])
    start = int(args["current_start"])
    report.exact("current_end", start + F_lat * L, int(args["current_end"]))
    cache = KVCache(
        KVCacheConfig(
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            frame_tokens=L,
            num_frames=int(pc["local_attn_size"]),
            num_sink=int(man["model_config"]["sink_size_hardcoded"]),
            sink_threshold=-1.0,
            eviction="fifo",
        ),
        dtype=dtype,
        device=dev,
    )
    plan = cache.plan([start], F_lat)
    cross = dit.cross_kv(case.tensor("inputs/prompt_embeds").to(dev, dtype))
    text = vace.text_kv(dit, case.tensor("inputs/prompt_embeds").to(dev, dtype))
    trace: dict[str, torch.Tensor] = {}
    scale = args.get("vace_context_scale")
    ext = VaceExtension(vace, context, text, 1.0 if scale is None else float(scale), trace=trace)
    flow = dit.forward_stream(x, t, cross, cache, plan, ext)
    x0 = (
        FlowMatchScheduler()
        .flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t.flatten())
        .unflatten(0, x.shape[:2])
    )

    report.compare("intermediates/x_tokens", trace["x_tokens"], case.tensor("intermediates/x_tokens"), bound)
    report.compare(
        "intermediates/vace_tokens", trace["vace_tokens"], case.tensor("intermediates/vace_tokens"), bound
    )
    hints = ext.hints or []
    n_hints = len([k for k in case.tensors if k.startswith("outputs/hints/")])
    report.exact("number of hints", len(hints), n_hints)
    for n, hint in enumerate(hints):
        report.compare(f"outputs/hints/{n}", hint, case.tensor(f"outputs/hints/{n}"), bound)
    report.compare("outputs/flow_pred", flow, case.tensor("outputs/flow_pred"), bound)
    report.compare("outputs/output", x0, case.tensor("outputs/output"), bound)


# ------------------------------------------------------------------------------------------------
# Streams
# ------------------------------------------------------------------------------------------------
class _CheckedReplay(ReplayNoise):
    """Recorded draws, remembering the shape the session asked for each time."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        super().__init__(draws)
        self.asked: list[tuple[int, ...]] = []

    def randn(self, shape: Any, **kwargs: Any) -> torch.Tensor:
        self.asked.append(tuple(shape))
        return super().randn(shape, **kwargs)


def _write_png(path: Path, rgb01: torch.Tensor) -> None:
    """[3, H, W] in [0, 1] → an 8-bit PNG holding round(x·255), as the case's recording did."""
    import av

    array = (rgb01.double() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _expected_encodes(case: GoldenCase, chunk: dict[str, Any]) -> list[_Encode]:
    """The chunk's recorded encodes; where Scope built the pixels from our inputs (conditioning chunks)
    they are implied: frames·(1−m), then frames·m, m = mask > 0.5 (the case README)."""
    k = int(chunk["chunk"])
    out = []
    encodes = [(j, rec) for j, rec in enumerate(chunk["vae_calls"]) if rec.get("op") == "encode_to_latent"]
    implied: list[torch.Tensor] = []
    conditioning = "conditioning" in str(chunk.get("mode") or "").split("+")
    if f"chunks/{k}/vace_input_frames" in case.tensors and conditioning:
        frames = case.tensor(f"chunks/{k}/vace_input_frames")[0]
        name = f"chunks/{k}/vace_input_masks"
        m = (case.tensor(name)[0] > 0.5).float() if name in case.tensors else torch.ones_like(frames[:1])
        implied = [frames * (1 - m), frames * m]
    for i, (j, rec) in enumerate(encodes):
        base = f"chunks/{k}/vae/{j}"
        pixel = case.tensors.get(f"{base}/pixel")
        if pixel is None and i < len(implied):
            pixel = implied[i]
        out.append(
            _Encode(
                base,
                _latent(case.tensor(f"{base}/latent")),
                bool(rec["use_cache"]),
                rec.get("in_shape"),
                pixel,
            )
        )
    return out


def _stream(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    man, dev, dtype = case.manifest, options.device, options.dtype
    bound = _bound(case, options)
    pc, mc = man["pipeline_config"], man["model_config"]
    if int(pc.get("num_frame_per_block", 1)) != 1:
        raise CaseError(
            f"{case.name}: num_frame_per_block {pc['num_frame_per_block']} (StreamDiffusionV2 uses 1)"
        )
    dit, vace, _ = _models(case, options)
    # Decoding is not part of these cases (they compare latents); a tiny random Wan VAE decodes.
    decoder = WanVAE(WanVAEConfig(dim=8, num_res_blocks=1)).to(dev, dtype).eval().requires_grad_(False)
    components = Components(
        dit=dit, device=torch.device(dev), dtype=dtype, wan_vae=decoder, vace=vace, label=case.name
    )
    settings = StreamSettings(
        height=int(pc["height"]),
        width=int(pc["width"]),
        mode="text",
        steps=tuple(int(t) for t in man["denoising_step_list"]),
        batching="none",
        eviction="fifo",
        cache_context="clean",
        kv_cache_frames=int(pc["local_attn_size"]),
        sink_frames=int(mc["sink_size_hardcoded"]),
        sink_threshold=-1.0,
        rope_reset_frame=None,
        noise_controller=False,
    )
    L = settings.frame_tokens
    report.exact("frame_seq_length", L, int(pc["frame_seq_length"]))
    draw_names = sorted(k for k in case.tensors if k.startswith("random_draws/"))
    rng = _CheckedReplay([case.tensor(k) for k in draw_names])
    session = StreamSession(components, settings, noise=rng, output="float")
    expected = [e for chunk in man["chunks"] for e in _expected_encodes(case, chunk)]
    encoder = _RecordedEncoder(expected)
    cond = VaceConditioner(session, encoder=encoder)
    session.attach(cond)
    session.set_prompt_embeddings(case.tensor("inputs/prompt_embeds").to(dev, dtype))

    calls: list[tuple[DiTCall, dict[str, Any]]] = []

    def record(call: DiTCall) -> None:
        ext = cond.last_extension
        clean = call.timesteps == [0]
        hints = None if clean or ext is None or ext.hints is None else [h.clone() for h in ext.hints]
        calls.append(
            (
                call,
                {
                    "hints": hints,
                    "scale": None if hints is None else ext.scale,  # type: ignore[union-attr]
                    "global_end_index": session.denoiser.cache.bookkeeping(0)["global_end_index"],
                    "local_end_index": min(
                        session.denoiser.cache.host.frames_written[0], settings.kv_cache_frames
                    )
                    * L,
                },
            )
        )

    session.denoiser.on_call.append(record)
    draws_per_chunk: list[range] = []
    contexts: dict[int, torch.Tensor | None] = {}
    with tempfile.TemporaryDirectory(prefix="wanstream-vace-") as tmp:
        for chunk in man["chunks"]:
            k = int(chunk["chunk"])
            _feed(case, chunk, cond, Path(tmp))
            before = rng.taken
            session.generate(1)
            draws_per_chunk.append(range(before, rng.taken))
            contexts[k] = cond.last_extension.context if cond.last_extension is not None else None

    encoder.check(report, bound)
    report.exact("every recorded random draw consumed", rng.remaining, 0)
    report.exact("random draw shapes", rng.asked, [tuple(case.tensor(k).shape) for k in draw_names])
    for chunk, taken in zip(man["chunks"], draws_per_chunk, strict=True):
        k = int(chunk["chunk"])
        report.exact(f"chunk {k} random draws", list(taken), [int(d) for d in chunk["random_draws"]])
        shape = chunk.get("vace_context_shape")
        ours = contexts.get(k)
        report.exact(f"chunk {k} vace_context shape", None if ours is None else list(ours.shape), shape)
        if ours is not None and f"chunks/{k}/vace_context" in case.tensors:
            report.compare(f"chunks/{k}/vace_context", ours, case.tensor(f"chunks/{k}/vace_context"), bound)
        last = [i for i in chunk["calls"] if not man["calls"][i]["clean_kv_cache_pass"]]
        if last and last[-1] < len(calls) and f"chunks/{k}/output_latents" in case.tensors:
            name = f"chunks/{k}/output_latents"
            report.compare(name, calls[last[-1]][0].x0, case.tensor(name), bound)

    report.exact("number of DiT calls", len(calls), len(man["calls"]))
    for (call, seen), rec in zip(calls, man["calls"], strict=False):
        i = int(rec["call"])
        p = f"calls/{i:03d}"
        start = call.starts[0]
        report.exact(
            f"{p} timestep", [t for t in call.timesteps for _ in range(call.frames)], rec["timestep"]
        )
        report.exact(
            f"{p} current_start/end/start_frame",
            [start, start + call.frames * L, start // L],
            [rec["current_start"], rec["current_end"], rec["start_frame"]],
        )
        report.exact(
            f"{p} cache indices after",
            [seen["global_end_index"], seen["local_end_index"]],
            [rec["cache_after"]["global_end_index"], rec["cache_after"]["local_end_index"]],
        )
        report.exact(f"{p} has VACE hints", seen["hints"] is not None, bool(rec["has_vace_context"]))
        if seen["hints"] is not None:
            report.exact(f"{p} vace_context_scale", seen["scale"], rec["vace_context_scale"])
            names = sorted(k for k in case.tensors if k.startswith(f"{p}/hints/"))
            report.exact(f"{p} number of hints", len(seen["hints"]), len(names))
            for n, hint in enumerate(seen["hints"]):
                if f"{p}/hints/{n}" in case.tensors:
                    report.compare(f"{p}/hints/{n}", hint, case.tensor(f"{p}/hints/{n}"), bound)
        report.compare(f"{p}/noisy_input", call.x, case.tensor(f"{p}/noisy_input"), bound)
        report.compare(f"{p}/flow_pred", call.flow, case.tensor(f"{p}/flow_pred"), bound)
        report.compare(f"{p}/output", call.x0, case.tensor(f"{p}/output"), bound)


def _feed(case: GoldenCase, chunk: dict[str, Any], cond: VaceConditioner, tmp: Path) -> None:
    """Give the conditioner what Scope's pipeline got for this chunk (modes may combine with '+')."""
    k = int(chunk["chunk"])
    parts = set(str(chunk.get("mode") or "none").split("+"))
    known = {"none", "conditioning", "r2v", "refs", "extension:firstframe", "extension:lastframe"}
    if not parts <= known:
        raise CaseError(
            f"{case.name}: chunk {k} has mode {chunk.get('mode')!r}, which this family does not know"
        )
    extension = [p for p in parts if p.startswith("extension:")]
    if len(extension) > 1 or (extension and parts & {"r2v", "refs"}):
        raise CaseError(f"{case.name}: chunk {k} needs two images; the case format names one per chunk")
    scale = chunk.get("vace_context_scale")
    cond.set_scale(1.0 if scale is None else float(scale))
    frames = f"chunks/{k}/vace_input_frames"
    if frames in case.tensors:
        masks = f"chunks/{k}/vace_input_masks"
        cond.push_control(case.tensor(frames), case.tensor(masks) if masks in case.tensors else None)
    elif "conditioning" in parts:
        raise CaseError(f"{case.name}: chunk {k} is a conditioning chunk without {frames}")
    if parts & {"r2v", "refs"} or extension:
        png = tmp / f"image_{k}.png"
        _write_png(png, case.tensor(f"chunks/{k}/ref_image_rgb01"))
        image = read_image(png)  # through a PNG file, as Scope's loader reads it
        if extension == ["extension:firstframe"]:
            cond.set_first_frame(image)
        elif extension == ["extension:lastframe"]:
            cond.set_last_frame(image)
        else:
            cond.set_reference_images([image])
