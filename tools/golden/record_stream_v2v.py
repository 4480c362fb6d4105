#!/usr/bin/env python3
"""Record a `stream_v2v_end_to_end` golden case from the authors' StreamDiffusionV2 code itself.

The reference (chenfengxu714/StreamDiffusionV2 at c5a0f20, given as its source tarball) runs its own
`python -m streamv2v.inference_wo_batch` / `streamv2v.inference` `main()` on the CPU with the tiny random
weights of tests/golden (`stream_v2v_weights.*`, official key layouts), the way the shared cases were
recorded (tests/golden/README.md): umT5 replaced by fixed prompt embeddings, the hard-coded 1.3B head
count / head_dim / VAE width adapted to the tiny models, `torch.bfloat16` mapped to float32 in the four
pipeline modules, every `torch.randn`/`randn_like` logged, the mp4 reader/writer replaced by a synthetic
clip and a capture. No reference file is edited.

It then runs the reference a second time in real bfloat16 (the mapping off) with the same random draws and
stores that run's rel-L2 against its own float32 run in the manifest (`precision.reference_bfloat16_*`):
the measured basis of the family's bf16 bound (see `python -m wanstream.conformance --help`).

Needs the reference's extra packages importable (diffusers, omegaconf, einops, easydict; e.g.
`pip install --target /tmp/sdv2-site diffusers==0.42.1 omegaconf==2.4.0 einops easydict` and `--site`).

    python tools/golden/record_stream_v2v.py --reference sdv2-c5a0f20.tar.gz --site /tmp/sdv2-site \\
        --out tests/golden --case stream_v2v_wo_batch_rope_reset --frames 209 --height 16 --width 32 \\
        --num-kv-cache 5
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import tarfile
import tempfile
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

REF_COMMIT = "c5a0f20d4320787b1031fa0e32802a60f9cdd2a6"
WEIGHTS = "stream_v2v_weights"  # side files shared by the stream_v2v cases (tests/golden)
PIPELINE_MODULES = (
    "streamv2v.inference",
    "streamv2v.inference_wo_batch",
    "models.wan.causal_stream_inference",
    "models.wan.wan_wrapper",
)
ENTRY = {"nobatch": "streamv2v.inference_wo_batch", "batch": "streamv2v.inference"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--reference", type=Path, required=True, help="sdv2-c5a0f20.tar.gz (or an unpacked folder)"
    )
    p.add_argument("--site", type=Path, help="folder holding the reference's extra packages (sys.path)")
    p.add_argument("--weights", type=Path, default=Path("tests/golden"), help=f"folder with {WEIGHTS}.*")
    p.add_argument("--out", type=Path, required=True, help="folder to write <case>.json/.safetensors into")
    p.add_argument("--case", required=True)
    p.add_argument("--mode", choices=sorted(ENTRY), default="nobatch")
    p.add_argument("--frames", type=int, default=209, help="1 + 4 * chunks (209: 52 chunks)")
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-kv-cache", type=int, default=5, help="YAML num_kv_cache (the real YAML has 6)")
    p.add_argument("--seed", type=int, default=1703)
    p.add_argument("--prompt-tokens", type=int, default=9)
    p.add_argument(
        "--replay",
        metavar="CASE",
        help="instead of recording: rerun an existing case of --weights (its inputs, size, seed, kv cache and "
        "mode), check the float32 run reproduces its final video, and print the reference's own bf16 error",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def synthetic_video(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """[1, 3, T, H, W] uint8: a drifting gradient with a static stretch (motion 0) and two hard cuts."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    texture = torch.randint(0, 40, (3, height, width), generator=g)
    out = torch.empty(3, frames, height, width, dtype=torch.uint8)
    for t in range(frames):
        shift = 0 if 20 <= t < 45 else t  # frames 20..44 hold still
        scene = (t >= 90) + (t >= 160)  # cuts at frames 90 and 160
        base = torch.stack([x * 6 + 2 * shift, y * 9 + 3 * shift, (x + y) * 3 + 70 * scene])
        out[:, t] = ((base + texture * (1 + scene)) % 256).to(torch.uint8)
    return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------
# The reference, imported from a scratch copy with the recording patches


class Draws:
    """Every torch.randn / randn_like of the pipeline modules: logged (record) or handed back (replay)."""

    def __init__(self, replay: list[torch.Tensor] | None = None) -> None:
        self.replay = replay
        self.log: list[dict[str, Any]] = []
        self.tensors: list[torch.Tensor] = []
        self.during = "?"

    def draw(self, op: str, like: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        frame = sys._getframe(2)
        consumer = f"{_ref_path(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}"
        i = len(self.tensors)
        if self.replay is None:
            value = torch.randn_like(like) if like is not None else torch.randn(*args, **kwargs)
            value32 = value.float()
        else:
            value32 = self.replay[i]
            dtype = like.dtype if like is not None else kwargs.get("dtype", torch.float32)
            value = value32.to(dtype=dtype, device=like.device if like is not None else "cpu")
        self.tensors.append(value32.detach().cpu().clone())
        self.log.append(
            {"index": i, "op": op, "shape": list(value.shape), "consumer": consumer, "during": self.during}
        )
        return value


def _ref_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("streamv2v", "models"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) :])
    return Path(filename).name


def torch_proxy(draws: Draws, bf16_as: torch.dtype) -> types.ModuleType:
    """The real torch, except `bfloat16` (→ `bf16_as`) and the logged random draws."""
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    proxy.bfloat16 = bf16_as
    proxy.randn = lambda *a, **k: draws.draw("randn", None, *a, **k)
    proxy.randn_like = lambda t, **k: draws.draw("randn_like", t)
    return proxy


class Reference:
    """The unpacked reference, imported once; `run` replays its CLI `main()` under the patches."""

    def __init__(self, source: Path, site: Path | None, scratch: Path) -> None:
        if source.is_dir():
            self.root = source
        else:
            with tarfile.open(source) as tar:
                tar.extractall(scratch / "ref", filter="data")
            self.root = next(p.parent for p in (scratch / "ref").rglob("inference_wo_batch.py")).parent
        self.project = scratch / "project"
        os.environ["STREAMDIFFUSIONV2_ROOT"] = str(self.project)  # read at import by wan_wrapper
        if site is not None:
            sys.path.insert(0, str(site))
        sys.path.insert(0, str(self.root))
        # diffusers (and transformers under it) probe optional packages at import: before any placeholder.
        import diffusers.configuration_utils
        import diffusers.models.modeling_utils
        import diffusers.utils  # noqa: F401

        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))  # only reads/resizes mp4 files
        import importlib

        self.mods = {name: importlib.import_module(name) for name in PIPELINE_MODULES}
        self.models = importlib.import_module("models")
        self.vae_mod = importlib.import_module("models.wan.wan_base.modules.vae")

    def write_project(
        self, weights: Path, config_json: dict, yaml_changes: dict[str, Any], prompt: str
    ) -> None:
        """wan_models/, ckpts/ and work/ as the reference's own loaders expect them."""
        wan = self.project / "wan_models" / "Wan2.1-T2V-1.3B"
        ckpt = self.project / "ckpts" / "wan_causal_dmd_v2v"
        work = self.project / "work"
        for d in (wan, ckpt, work):
            d.mkdir(parents=True, exist_ok=True)
        (wan / "config.json").write_text(json.dumps(config_json))
        generator = torch.load(weights / f"{WEIGHTS}.model.pt", map_location="cpu")["generator"]
        save_file(
            {k.removeprefix("model."): v.contiguous() for k, v in generator.items()}, wan / "x.safetensors"
        )
        (wan / "x.safetensors").rename(wan / "diffusion_pytorch_model.safetensors")
        shutil.copy(weights / f"{WEIGHTS}.Wan2.1_VAE.pth", wan / "Wan2.1_VAE.pth")
        shutil.copy(weights / f"{WEIGHTS}.model.pt", ckpt / "model.pt")
        yaml = (self.root / "configs" / "wan_causal_dmd_v2v.yaml").read_text().splitlines()
        for key, value in yaml_changes.items():
            hits = [i for i, line in enumerate(yaml) if line.startswith(f"{key}:")]
            assert len(hits) == 1, key
            yaml[hits[0]] = f"{key}: {value}"
        (work / "config.yaml").write_text("\n".join(yaml) + "\n")
        (work / "prompt.txt").write_text(prompt + "\n")

    def run(
        self,
        mode: str,
        argv: list[str],
        video: torch.Tensor,
        prompt_embeds: torch.Tensor,
        vae_args: dict[str, Any],
        draws: Draws,
        bf16_as: torch.dtype,
    ) -> dict[str, Any]:
        """One `main()`; returns the trace (DiT calls, noise-controller results, decodes, final video)."""
        entry = self.mods[ENTRY[mode]]
        csi = self.mods["models.wan.causal_stream_inference"]
        ww = self.mods["models.wan.wan_wrapper"]
        trace: dict[str, Any] = {"events": [], "final_video": None}
        events = trace["events"]
        saved: list[tuple[Any, str, Any]] = []

        def patch(obj: Any, name: str, value: Any) -> None:
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        proxy = torch_proxy(draws, bf16_as)
        for mod in self.mods.values():
            patch(mod, "torch", proxy)

        class FixedTextEncoder(torch.nn.Module):  # umT5 skipped: its output format, our embeddings
            def __init__(self, model_type: str = "T2V-1.3B") -> None:
                super().__init__()
                padded = torch.zeros(1, 512, prompt_embeds.shape[-1])
                padded[:, : prompt_embeds.shape[1]] = prompt_embeds
                self.register_buffer("embeds", padded)

            def forward(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
                return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1).clone()}

        text_classes = self.models.TEXT_ENCODER_NAME_TO_CLASS
        old_text = dict(text_classes)
        text_classes.update(wan=FixedTextEncoder, causal_wan=FixedTextEncoder)
        patch(ww, "_video_vae", functools.partial(self.vae_mod._video_vae, **vae_args))

        init, init_kv, init_cross = (
            csi.CausalStreamInferencePipeline.__init__,
            csi.CausalStreamInferencePipeline._initialize_kv_cache,
            csi.CausalStreamInferencePipeline._initialize_crossattn_cache,
        )

        def tiny_init(pipe: Any, *a: Any, **k: Any) -> None:
            init(pipe, *a, **k)
            model = pipe.generator.model
            pipe.num_transformer_blocks, pipe.num_heads = len(model.blocks), model.num_heads
            pipe.generator.register_forward_hook(on_dit, with_kwargs=True)

        def head_dim(pipe: Any) -> int:
            return pipe.generator.model.dim // pipe.num_heads

        def tiny_kv(pipe: Any, batch_size: int, dtype: torch.dtype, device: Any) -> None:
            init_kv(pipe, batch_size, dtype, device)
            for c in pipe.kv_cache1:  # the reference hard-codes head_dim 128
                c["k"] = torch.zeros([*c["k"].shape[:3], head_dim(pipe)], dtype=dtype, device=device)
                c["v"] = torch.zeros([*c["v"].shape[:3], head_dim(pipe)], dtype=dtype, device=device)

        def tiny_cross(pipe: Any, batch_size: int, dtype: torch.dtype, device: Any) -> None:
            init_cross(pipe, batch_size, dtype, device)
            for c in pipe.crossattn_cache:
                c["k"] = torch.zeros([*c["k"].shape[:3], head_dim(pipe)], dtype=dtype, device=device)
                c["v"] = torch.zeros([*c["v"].shape[:3], head_dim(pipe)], dtype=dtype, device=device)

        def on_dit(module: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> None:
            events.append(
                {
                    "kind": "dit",
                    "during": draws.during,
                    "x": kwargs["noisy_image_or_video"].float().clone(),
                    "timestep": kwargs["timestep"].tolist(),
                    "current_start": torch.as_tensor(kwargs["current_start"]).reshape(-1).tolist(),
                    "current_end": torch.as_tensor(kwargs["current_end"]).reshape(-1).tolist(),
                    "out": out.float().clone(),
                }
            )

        patch(csi.CausalStreamInferencePipeline, "__init__", tiny_init)
        patch(csi.CausalStreamInferencePipeline, "_initialize_kv_cache", tiny_kv)
        patch(csi.CausalStreamInferencePipeline, "_initialize_crossattn_cache", tiny_cross)

        noise_controller = entry.compute_noise_scale_and_step

        def traced_controller(*a: Any, **k: Any) -> tuple[float, int]:
            scale, step = noise_controller(*a, **k)
            events.append(
                {"kind": "noise_controller", "noise_scale": float(scale), "current_step": int(step)}
            )
            return scale, step

        patch(entry, "compute_noise_scale_and_step", traced_controller)
        manager = entry.SingleGPUInferencePipeline
        encode, decode, prepare = (
            manager._timed_stream_encode,
            manager._timed_stream_decode,
            manager.prepare_pipeline,
        )

        def traced_encode(mgr: Any, images: torch.Tensor) -> torch.Tensor:
            draws.during = "stream_encode"
            out = encode(mgr, images)
            events.append({"kind": "stream_encode", "frames": int(images.shape[2])})
            return out

        def traced_prepare(mgr: Any, *a: Any, **k: Any) -> torch.Tensor:
            draws.during = "prepare"
            return prepare(mgr, *a, **k)

        def traced_decode(mgr: Any, latent: torch.Tensor) -> torch.Tensor:
            video = decode(mgr, latent)
            events.append({"kind": "stream_decode_to_pixel", "frames": int(video.shape[1])})
            draws.during = "inference_wo_batch" if mode == "nobatch" else "inference_stream"
            return video

        patch(manager, "_timed_stream_encode", traced_encode)
        patch(manager, "_timed_stream_decode", traced_decode)
        patch(manager, "prepare_pipeline", traced_prepare)
        patch(entry, "load_mp4_as_tensor", lambda *a, **k: video[0].float() / 127.5 - 1.0)

        def capture(frames: np.ndarray, *a: Any, **k: Any) -> None:
            trace["final_video"] = torch.from_numpy(np.asarray(frames)).float().clone()

        patch(entry, "export_to_video", capture)
        old_argv = sys.argv
        sys.argv = [ENTRY[mode], *argv]
        try:
            with torch.inference_mode():
                entry.main()
        finally:
            sys.argv = old_argv
            text_classes.clear()
            text_classes.update(old_text)
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)
        return trace


# ---------------------------------------------------------------------------------------------------------
# The case


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    shared = json.loads((args.weights / "stream_v2v_wo_batch.json").read_text())
    config_json = json.loads((args.weights / f"{WEIGHTS}.config.json").read_text())
    vae_args = dict(shared["models"]["vae"]["constructor_args"])
    vae_partial = {k: vae_args[k] for k in ("dim", "num_res_blocks")}
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt_embeds = torch.randn(1, args.prompt_tokens, 4096, generator=g, dtype=torch.float64).float()
    video = synthetic_video(args.frames, args.height, args.width, args.seed)
    replayed = None
    if args.replay:
        from safetensors.torch import load_file

        replayed = json.loads((args.weights / f"{args.replay}.json").read_text())
        golden = load_file(str(args.weights / f"{args.replay}.safetensors"))
        video, prompt_embeds = golden["inputs/video_uint8"], golden["inputs/prompt_embeds"]
        rc = replayed["resolved_config"]
        args.height, args.width, args.seed = int(rc["height"]), int(rc["width"]), int(rc["seed"])
        args.num_kv_cache, args.frames = int(rc["num_kv_cache"]), int(video.shape[2])
        args.mode = "nobatch" if "inference_wo_batch" in replayed["reference"]["entry_point"] else "batch"
    cli = [
        "--config_path", "PROJECT_ROOT/work/config.yaml",
        "--checkpoint_folder", "PROJECT_ROOT/ckpts/wan_causal_dmd_v2v",
        "--output_folder", "PROJECT_ROOT/work/out",
        "--prompt_file_path", "PROJECT_ROOT/work/prompt.txt",
        "--video_path", "synthetic_input.mp4",
        "--height", str(args.height), "--width", str(args.width), "--seed", str(args.seed),
    ]  # fmt: skip
    yaml_changes = {"num_kv_cache": args.num_kv_cache}

    with tempfile.TemporaryDirectory(prefix="sdv2-record-") as tmp:
        ref = Reference(args.reference, args.site, Path(tmp))
        ref.write_project(args.weights, config_json, yaml_changes, "a tiny synthetic scene")
        argv_run = [a.replace("PROJECT_ROOT", str(ref.project)) for a in cli]
        resolved = _resolved_config(ref, args.mode, argv_run)
        draws32 = Draws()
        try:
            run32 = ref.run(args.mode, argv_run, video, prompt_embeds, vae_partial, draws32, torch.float32)
            draws16 = Draws(replay=draws32.tensors)
            run16 = ref.run(args.mode, argv_run, video, prompt_embeds, vae_partial, draws16, torch.bfloat16)
        except Exception:
            traceback.print_exc()
            return 1
    assert len(draws16.tensors) == len(draws32.tensors), "the bf16 run drew a different number of times"
    if replayed is not None:
        gap = rel_l2(run32["final_video"], golden["outputs/final_video"])
        bound = replayed["precision"]["suggested_rel_l2_bound_final_video"]
        print(
            json.dumps(
                {
                    "case": args.replay,
                    "float32_run_bit_exact": torch.equal(run32["final_video"], golden["outputs/final_video"]),
                    "float32_run_vs_golden_rel_l2": gap,
                    "reference_bfloat16_vs_float32_rel_l2": _bf16_errors(run32, run16),
                }
            )
        )
        return 0 if gap <= bound else 1
    _write_case(args, shared, config_json, resolved, cli, video, prompt_embeds, draws32, run32, run16)
    return 0


def _bf16_errors(run32: dict[str, Any], run16: dict[str, Any]) -> dict[str, float]:
    dit32 = [e for e in run32["events"] if e["kind"] == "dit"]
    dit16 = [e for e in run16["events"] if e["kind"] == "dit"]
    return {
        "final_video": rel_l2(run16["final_video"], run32["final_video"]),
        "dit_out_max": max(rel_l2(b["out"], a["out"]) for a, b in zip(dit32, dit16, strict=True)),
    }


def _resolved_config(ref: Reference, mode: str, argv: list[str]) -> dict[str, Any]:
    """The config `main()` builds (YAML merged with the parsed CLI), PROJECT_ROOT written symbolically."""
    from omegaconf import OmegaConf

    entry = ref.mods[ENTRY[mode]]
    captured: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def grab(config_path: str, cli_args: Any) -> Any:
        config = merge(config_path, cli_args)
        captured.update(OmegaConf.to_container(config, resolve=True))
        raise Stop

    merge = entry.merge_cli_config
    entry.merge_cli_config = grab
    old_argv, sys.argv = sys.argv, [ENTRY[mode], *argv]
    try:
        entry.main()
    except Stop:
        pass
    finally:
        entry.merge_cli_config, sys.argv = merge, old_argv
    root = os.environ["STREAMDIFFUSIONV2_ROOT"]
    return json.loads(json.dumps(captured).replace(root, "PROJECT_ROOT"))


def _recorded_by(args: argparse.Namespace) -> str:
    """The command that re-records this case (paths of the inputs left as placeholders)."""
    return (
        "python tools/golden/record_stream_v2v.py --reference <sdv2-c5a0f20.tar.gz> --site <packages> "
        f"--weights tests/golden --out tests/golden --case {args.case} --mode {args.mode} --frames {args.frames} "
        f"--height {args.height} --width {args.width} --num-kv-cache {args.num_kv_cache} --seed {args.seed} "
        f"--prompt-tokens {args.prompt_tokens}"
    )


def _write_case(
    args: argparse.Namespace,
    shared: dict[str, Any],
    config_json: dict[str, Any],
    cfg: dict[str, Any],
    cli: list[str],
    video: torch.Tensor,
    prompt_embeds: torch.Tensor,
    draws: Draws,
    run32: dict[str, Any],
    run16: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {
        "inputs/video_uint8": video.contiguous(),
        "inputs/prompt_embeds": prompt_embeds.contiguous(),
        "outputs/final_video": run32["final_video"].contiguous(),
    }
    for d in draws.log:
        d["tensor"] = f"inputs/random_draws/{d['index']:03d}"
        tensors[d["tensor"]] = draws.tensors[d["index"]].contiguous()
    events, dit16 = [], [e for e in run16["events"] if e["kind"] == "dit"]
    dit_errors = []
    for i, e in enumerate(run32["events"]):
        event = {k: v for k, v in e.items() if not isinstance(v, torch.Tensor)} | {"index": i}
        if e["kind"] == "dit":
            n = sum(1 for ev in events if ev["kind"] == "dit")
            for name in ("x", "out"):
                event[name] = f"outputs/trace/{i:03d}_dit/{name}"
                tensors[event[name]] = e[name].contiguous()
            err = rel_l2(dit16[n]["out"], e["out"])
            event["reference_bfloat16_vs_float32_rel_l2"] = err
            dit_errors.append(err)
        events.append(event)

    fsl = (args.height // 16) * (args.width // 16)
    num_chunks = (args.frames - 1) // 4
    controller = [e for e in run32["events"] if e["kind"] == "noise_controller"]
    chunks = [{"chunk": 0, "input_frames": [0, 5], "noise_scale": "initial", "output_frames": [0, 5]}]
    for k in range(1, num_chunks):
        c = controller[k - 1]
        chunks.append(
            {
                "chunk": k,
                "input_frames": [1 + 4 * k, 5 + 4 * k],
                "noise_scale": c["noise_scale"],
                "current_step": c["current_step"],
                "output_frames": [1 + 4 * k, 5 + 4 * k],
            }
        )
    dits = [e for e in events if e["kind"] == "dit"]
    reset_calls = [
        i
        for i, (a, b) in enumerate(itertools.pairwise(dits))
        if b["current_start"][0] < a["current_start"][0]
    ]
    video_err = rel_l2(run16["final_video"], run32["final_video"])
    kv_len = fsl * args.num_kv_cache
    manifest: dict[str, Any] = {
        "case": args.case,
        "kind": "stream_v2v_end_to_end",
        "mode": "no stream batch (streamv2v/inference_wo_batch.py)"
        if args.mode == "nobatch"
        else "stream batch (streamv2v/inference.py)",
        "reference": {
            "repo": "chenfengxu714/StreamDiffusionV2",
            "commit": REF_COMMIT,
            "entry_point": f"python -m {ENTRY[args.mode]} (main())",
            "files": shared["reference"]["files"],
        },
        "reference_commits": shared["reference_commits"],
        "torch": torch.__version__,
        "recorded_by": _recorded_by(args),
        "command_line": ["python", "-m", ENTRY[args.mode], *cli],
        "resolved_config": cfg,
        "config_changes_vs_real_yaml": {"num_kv_cache": [6, args.num_kv_cache]},
        "models": {"dit": shared["models"]["dit"], "vae": shared["models"]["vae"]},
        "weights": {
            "files": shared["weights"]["files"],
            "shared_by_cases": shared["weights"]["shared_by_cases"],
            "init": shared["weights"]["init"],
        },
        "inputs": {
            "video_uint8": "[1, 3, T, H, W] uint8; the reference input is video = u8.float()/127.5 - 1",
            "video_content": "a drifting gradient over a fixed texture; frames 20..44 hold still (motion 0); "
            "hard cuts at frames 90 and 160",
            "prompt_embeds": f"[1, {args.prompt_tokens}, 4096] N(0, 1) (seed {args.seed + 1}): the text "
            "conditional; the pipeline sees it zero-padded to [1, 512, 4096]",
            "random_draws": "every torch.randn / randn_like the reference made, in call order",
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
        },
        "loop": {
            "entry_point": ENTRY[args.mode],
            # Observed, not assumed: the frame index the first reset fired at (None: not reached).
            "rope_reset_frame": (dits[reset_calls[0]]["current_start"][0] + fsl) // fsl
            if reset_calls
            else None,
            "rope_reset_to_token": kv_len - fsl,
            "rope_reset_at_dit_calls": [i + 1 for i in reset_calls],
        },
        "loop_description": (
            "As in stream_v2v_wo_batch (see its loop_description), longer: chunk 0 = frames [0, 5), chunk k "
            f"= frames [1+4k, 5+4k), num_chunks = {num_chunks}, frame_seq_length fsl = {fsl}, chunk k at "
            "token positions [(k+1)*fsl, (k+2)*fsl) until the position reset of run_inference: if "
            "current_start//fsl >= 50 then current_start = kv_cache_length - fsl "
            f"(= {kv_len - fsl}), current_end = current_start + fsl, and later chunks continue from there. "
            "Reached here at chunk 49 (its DiT calls start at token "
            f"{kv_len - fsl}); the loop's {len(cfg['denoising_step_list']) - 1} extra flush iterations "
            "after the last input chunk reuse the last noisy latents, draw new add_noise noise and are "
            "discarded."
            if args.mode == "nobatch"
            else "See stream_v2v_batch's loop_description; inference.py's run_inference has no position reset."
        ),
        "chunks": chunks,
        "num_chunks": num_chunks,
        "num_steps": len(cfg["denoising_step_list"]) - 1,
        "frame_seq_length": fsl,
        "kv_cache_length_tokens": kv_len,
        "output": {
            "final_video": "outputs/final_video [T_out, H, W, 3] float32 in [0,1]",
            "frames": args.frames,
        },
        "random_draws": draws.log,
        "events": events,
        "event_kinds": {
            "dit": "one CausalWanDiffusionWrapper forward: x [B,F,16,h,w] noisy input, timestep [B,F], "
            "per-lane token range current_start/current_end, out = x0 prediction",
            "noise_controller": "compute_noise_scale_and_step results",
            "stream_encode": "frames encoded",
            "stream_decode_to_pixel": "frames decoded",
        },
        "precision": {
            "suggested_rel_l2_bound_final_video": 5e-05,
            "suggested_rel_l2_bound_intermediates": 0.0002,
            "reference_bfloat16_vs_float32_rel_l2": {
                "final_video": video_err,
                "dit_out_max": max(dit_errors),
            },
            "bfloat16_note": "the same main() with torch.bfloat16 left as is (the real pipeline's dtype: DiT, "
            "KV cache, latents, VAE and input video in bf16) and the float32 run's random draws replayed, on "
            "the CPU; rel-L2 against the float32 run",
        },
        "patches": shared["patches"],
        "how_to_test": shared["how_to_test"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    st = args.out / f"{args.case}.safetensors"
    save_file(tensors, str(st))
    manifest["files"] = {
        st.name: {"bytes": st.stat().st_size, "sha256": hashlib.sha256(st.read_bytes()).hexdigest()}
    }
    manifest["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()
    }
    (args.out / f"{args.case}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(
        f"{args.case}: {len(dits)} DiT calls, {len(draws.log)} draws, RoPE reset before DiT calls "
        f"{manifest['loop']['rope_reset_at_dit_calls']}; reference bf16 vs float32: final video {video_err:.2e}, "
        f"DiT out max {max(dit_errors):.2e}; {st.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
