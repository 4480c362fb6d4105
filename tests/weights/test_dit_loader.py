"""`load_dit` reads every official DiT checkpoint format strictly and fails clearly on bad files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanstream.models.dit import WanConfig, WanDiT
from wanstream.weights.dit import load_dit
from wanstream.weights.loaders import CheckpointError, build_on_meta

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)


class NotATensor:
    """Something a training script might pickle next to the weights."""

    def __init__(self) -> None:
        self.lr = 1e-4


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = WanDiT(TINY).state_dict()
    return {k: torch.randn_like(v) for k, v in sd.items()}  # head.head is zero-initialised: perturb all


@pytest.fixture
def config_json(tmp_path: Path) -> Path:
    """A config.json in the official file's form (keys the diffusers dump carries, five omitted)."""
    path = tmp_path / "config.json"
    data = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v"}
    data |= {k: TINY.to_dict()[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")}
    path.write_text(json.dumps(data))
    return path


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


FORMATS = {
    "diffusers-safetensors": ("diffusion_pytorch_model.safetensors", lambda sd: sd),
    "model.pt generator": ("model.pt", lambda sd: {"generator": prefixed(sd, "model.")}),
    "model.pt generator+ema": (
        "model.pt",
        lambda sd: {"generator": prefixed(sd, "model."), "generator_ema": {"model.x": torch.zeros(1)}},
    ),
    "generator_ema": ("model.pt", lambda sd: {"generator_ema": prefixed(sd, "model.")}),
    "state_dict": ("model.pt", lambda sd: {"state_dict": sd}),
    "raw": ("model.pt", lambda sd: sd),
    "raw model.": ("checkpoint.pth", lambda sd: prefixed(sd, "model.")),
    "fsdp": ("model.pt", lambda sd: {"generator": prefixed(sd, "model._fsdp_wrapped_module.")}),
    "fsdp outer": ("model.pt", lambda sd: {"generator": prefixed(sd, "_fsdp_wrapped_module.model.")}),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_official_format_loads_strictly_and_exactly(
    fmt: str, weights: dict, config_json: Path, tmp_path: Path
) -> None:
    name, wrap = FORMATS[fmt]
    path = tmp_path / name
    obj = wrap(weights)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    model = load_dit(path, config_json, dtype=torch.float32)
    got = model.state_dict()
    assert got.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(got[k], v), k
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_a_checkpoint_folder_and_a_sharded_index_load_too(weights: dict, tmp_path: Path) -> None:
    folder = tmp_path / "wan_causal_dmd_v2v"
    folder.mkdir()
    torch.save({"generator": prefixed(weights, "model.")}, folder / "model.pt")
    assert torch.equal(
        load_dit(folder, TINY, dtype=torch.float32).state_dict()["head.head.weight"],
        weights["head.head.weight"],
    )

    keys = sorted(weights)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for shard, names in shards.items():
        save_file({k: weights[k].contiguous() for k in names}, str(tmp_path / shard))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: s for s, names in shards.items() for k in names}}))
    got = load_dit(index, TINY, dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], weights[k]) for k in keys)


def test_dtype_choice_and_float8_files(weights: dict, tmp_path: Path) -> None:
    fp8 = {
        k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in weights.items()
    }
    path = tmp_path / "dit_fp8_e4m3fn.safetensors"
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(path))

    upcast = load_dit(path, TINY)  # default: bf16 compute, every weight converted once
    assert {p.dtype for p in upcast.parameters()} == {torch.bfloat16}
    assert torch.equal(upcast.blocks[0].ffn[0].weight, fp8["blocks.0.ffn.0.weight"].to(torch.bfloat16))

    kept = load_dit(path, TINY, weight_dtype=torch.float8_e4m3fn)  # linear weights stay float8
    assert kept.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert kept.blocks[0].modulation.dtype == torch.bfloat16
    assert torch.equal(kept.blocks[0].ffn[0].weight, fp8["blocks.0.ffn.0.weight"])
    bytes_kept = sum(p.numel() * p.element_size() for p in kept.parameters())
    bytes_up = sum(p.numel() * p.element_size() for p in upcast.parameters())
    assert bytes_kept < 0.6 * bytes_up

    torch.manual_seed(1)
    x = [torch.randn(16, 2, 4, 6, dtype=torch.bfloat16)]
    t = torch.tensor([500.0])
    ctx = [torch.randn(5, 32, dtype=torch.bfloat16)]
    with torch.no_grad():
        a = upcast.forward_full(x, t, ctx, seq_len=None)[0]
        b = kept.forward_full(x, t, ctx, seq_len=None)[0]
    assert torch.equal(a, b)  # per-call upcast of the same float8 values: bit-identical

    with pytest.raises(ValueError, match="weight_dtype"):
        load_dit(path, TINY, weight_dtype=torch.float16)


def test_the_14b_generator_with_the_1_3b_config_explains_the_mix_up() -> None:
    # Full-size state dicts on the meta device: shapes without memory.
    big = build_on_meta(lambda: WanDiT(WanConfig.t2v_14b())).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_dit({f"model.{k}": v for k, v in big.items()}, WanConfig.t2v_1_3b(), source="ckpt/model.pt")
    message = str(err.value)
    assert message.startswith("ckpt/model.pt: this checkpoint is a Wan2.1-T2V-14B DiT")
    assert "describes Wan2.1-T2V-1.3B" in message and "dim 5120 (config 1536)" in message
    assert "Wan2.1-T2V-14B/config.json" in message


def _saved(tmp_path: Path, obj: object, name: str = "model.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop("blocks.1.ffn.2.bias"), r"missing keys: blocks\.1\.ffn\.2\.bias"),
        (
            lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(2)}),
            r"unexpected keys: blocks\.0\.extra",
        ),
        (
            lambda sd: sd.update({"head.head.bias": torch.zeros(65)}),
            r"wrong shapes: head\.head\.bias \(file \(65,\), model \(64,\)\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_keys_name_the_file_and_the_first_offending_keys(
    edit: object, expected: str, weights: dict, tmp_path: Path
) -> None:
    sd = dict(weights)
    edit(sd)  # type: ignore[operator]
    path = _saved(tmp_path, {"generator": prefixed(sd, "model.")})
    with pytest.raises(CheckpointError, match=rf"^{path}: does not match WanDiT: .*{expected}"):
        load_dit(path, TINY)


def test_many_missing_keys_are_summarised(weights: dict, tmp_path: Path) -> None:
    sd = {k: v for k, v in weights.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.\S+, .*… \(\d+ in all\)"):
        load_dit(_saved(tmp_path, sd), TINY)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (torch.zeros(3), "not a state dict"),
        ([1, 2, 3], "not a state dict"),
        ({"generator": {"model.a": "text"}}, "not a state dict of tensors"),
        (
            {"optimizer": {"lr": torch.tensor(1.0)}, "step": {"n": torch.tensor(3)}},
            r"a checkpoint with .* but none of",
        ),
    ],
    ids=["tensor", "list", "strings", "no-generator"],
)
def test_not_a_state_dict_names_the_file(obj: object, expected: str, tmp_path: Path) -> None:
    path = _saved(tmp_path, obj)
    with pytest.raises(CheckpointError, match=rf"^{path}: {expected}"):
        load_dit(path, TINY)


def test_a_diffusers_layout_is_named(tmp_path: Path) -> None:
    sd = {"condition_embedder.time_proj.weight": torch.zeros(2), "blocks.0.attn1.to_q.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="diffusers-format WanTransformer3DModel"):
        load_dit(sd, TINY)


def test_missing_and_impostor_files_say_what_to_do(tmp_path: Path) -> None:
    models = tmp_path / "models"
    gen = models / "StreamDiffusionV2" / "wan_causal_dmd_v2v" / "model.pt"
    with pytest.raises(
        FileNotFoundError,
        match=rf"no such checkpoint file\. Fetch it with `wanstream download --models-dir {models}`",
    ):
        load_dit(gen, TINY)

    gen.parent.mkdir(parents=True)
    gen.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match=r"is a Git LFS pointer .*wanstream download"):
        load_dit(gen, TINY)

    gen.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(CheckpointError, match="is an HTML page"):
        load_dit(gen, TINY)

    gen.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_dit(gen, TINY)

    torch.save({"generator": {"model.a": torch.zeros(1000)}}, gen)
    gen.write_bytes(gen.read_bytes()[:-300])  # truncated download
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*--verify"):
        load_dit(gen, TINY)

    broken = tmp_path / "dit.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match=rf"^{broken}: not a readable checkpoint"):
        load_dit(broken, TINY)

    with pytest.raises(FileNotFoundError, match="no DiT checkpoint in this folder"):
        load_dit(tmp_path, TINY)


def test_pickled_python_objects_need_explicit_trust(
    weights: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path, {"generator": prefixed(weights, "model."), "extra": NotATensor()})
    with pytest.raises(CheckpointError, match="WANSTREAM_ALLOW_PICKLE=1"):
        load_dit(path, TINY)
    monkeypatch.setenv("WANSTREAM_ALLOW_PICKLE", "1")
    assert torch.equal(
        load_dit(path, TINY, dtype=torch.float32).state_dict()["patch_embedding.bias"],
        weights["patch_embedding.bias"],
    )


MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys, torch
    from wanstream.models.dit import WanConfig, WanDiT
    from wanstream.weights.dit import load_dit

    def status():
        text = open("/proc/self/status").read()
        return {k: int(re.search(k + r":\\s+(\\d+)", text).group(1)) * 1024 for k in ("VmHWM", "RssAnon")}

    cfg = WanConfig(**json.loads(sys.argv[1]))
    small = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=32)
    load_dit(WanDiT(small).state_dict(), small)  # warm up torch's lazy initialisation
    out = {}
    for path in sys.argv[2:]:
        for name, dtype in (("same", torch.float32), ("bf16", torch.bfloat16)):
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
            before = status()
            model = load_dit(path, cfg, dtype=dtype)
            after = status()
            out[f"{path}:{name}"] = {k: after[k] - before[k] for k in before}
            del model
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # a fresh interpreter (torch import) to measure peak memory honestly
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_loading_needs_no_second_copy_of_the_weights(tmp_path: Path) -> None:
    """Memory-mapped files + meta-device modules + assignment: at most one copy ever lives in RAM."""
    cfg = WanConfig(dim=320, ffn_dim=1280, num_heads=4, num_layers=5, text_dim=320)
    sd = WanDiT(cfg).state_dict()
    size = sum(v.numel() * v.element_size() for v in sd.values())  # ≈ 35 MB float32
    pt, st = tmp_path / "model.pt", tmp_path / "diffusion_pytorch_model.safetensors"
    torch.save({"generator": prefixed(sd, "model.")}, pt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    del sd
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")
    args = [json.dumps({k: getattr(cfg, k) for k in keys}), str(pt), str(st)]
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *args], capture_output=True, text=True, timeout=120, check=True
    )
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    for path in (pt, st):
        same, bf16 = growth[f"{path}:same"], growth[f"{path}:bf16"]
        # Same dtype: the parameters are the mapped file itself; no anonymous copy is made (the
        # file's pages may be read in, once: they are shared and reclaimable).
        assert same["RssAnon"] < 0.1 * size, (path.name, same, size)
        assert same["VmHWM"] < 1.1 * size, (path.name, same, size)
        # bf16: one converted copy (half the bytes) plus the file's pages as they are read; a
        # load that materialised the model and then copied a state dict in would need >= 2x.
        assert bf16["RssAnon"] < 0.75 * size, (path.name, bf16, size)
        assert bf16["VmHWM"] < 1.75 * size, (path.name, bf16, size)
