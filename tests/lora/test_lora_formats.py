"""LoRA files in every supported naming scheme load onto the right DiT layers; bad files are rejected
with the offending keys named; client-given names never leave the LoRA folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from wanstream.engine.lora import LoraManager
from wanstream.engine.settings import LoraSpec
from wanstream.models.dit import WanDiT
from wanstream.models.lora import linear_targets
from wanstream.weights.lora import LoraError, LoraFiles, load_lora, resolve_lora_path

from support.lora_files import LAYERS, SCHEMES, key_of, lora_state_dict, random_pairs, write_lora


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_each_naming_scheme_loads_onto_the_named_layers(dit: WanDiT, tmp_path: Path, scheme: str) -> None:
    shapes = linear_targets(dit)
    pairs = random_pairs(shapes, LAYERS, rank=3, alpha=1.5 if scheme != "wan-comfy" else None)
    path = write_lora(tmp_path / f"{scheme}.safetensors", lora_state_dict(pairs, scheme))
    weights = load_lora(path, shapes)
    assert list(weights.pairs) == [name for name in shapes if name in LAYERS]  # model order
    for layer, (down, up, alpha) in pairs.items():
        got = weights.pairs[layer]
        assert torch.equal(got.down, down) and torch.equal(got.up, up) and got.alpha == alpha
        assert got.factor == (alpha / 3 if alpha is not None else 1.0)

    # Merged onto the model, exactly those layers' weights change, by scale · alpha/rank · B·A.
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    manager = LoraManager(dit, source=LoraFiles())
    manager.apply([LoraSpec(path=str(path), scale=0.5)])
    after = dit.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{layer}.weight" for layer in LAYERS}
    for layer, (down, up, alpha) in pairs.items():
        expected = before[f"{layer}.weight"] + 0.5 * (alpha / 3 if alpha else 1.0) * up @ down
        torch.testing.assert_close(after[f"{layer}.weight"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True])
def test_torch_pickles_and_training_checkpoints(dit: WanDiT, tmp_path: Path, wrapped: bool) -> None:
    shapes = linear_targets(dit)
    tensors = lora_state_dict(random_pairs(shapes, ["blocks.0.ffn.0"]), "kohya")
    path = write_lora(tmp_path / "style.pt", {"state_dict": tensors, "epoch": 3} if wrapped else tensors)
    assert list(load_lora(path, shapes).pairs) == ["blocks.0.ffn.0"]


def _bad(dit: WanDiT, kind: str) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """A malformed state dict, the keys the error must name, and a phrase of the message."""
    shapes = linear_targets(dit)
    good = lora_state_dict(random_pairs(shapes, ["blocks.0.self_attn.q", "blocks.1.ffn.2"]), "wan-comfy")
    q = key_of("blocks.0.self_attn.q", "wan-comfy")
    if kind == "unmatched":
        extra = {"diffusion_model.blocks.0.self_attn.qq.lora_A.weight": torch.zeros(4, 32)}
        return good | extra, list(extra), "matches no linear layer"
    if kind == "bigger model":
        extra = {"diffusion_model.blocks.39.ffn.0.lora_A.weight": torch.zeros(4, 32)}
        return good | extra, list(extra), "this model has 2 blocks"
    if kind == "text encoder":
        extra = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}
        return good | extra, list(extra), "text encoder"
    if kind == "full delta":
        extra = {"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(32, 32)}
        return good | extra, list(extra), "full weight"
    if kind == "unknown suffix":
        extra = {"diffusion_model.blocks.0.norm3.weight": torch.zeros(32)}
        return good | extra, list(extra), "not a LoRA weight"
    if kind == "rank mismatch":
        bad = dict(good)
        bad[f"{q}.lora_B.weight"] = torch.zeros(32, 8)  # down has rank 4
        return bad, [f"{q}.lora_A.weight"], "rank mismatch"
    if kind == "shape mismatch":
        bad = dict(good)
        bad[f"{q}.lora_A.weight"] = torch.zeros(4, 48)  # a LoRA for a wider model
        bad[f"{q}.lora_B.weight"] = torch.zeros(48, 4)
        return bad, [f"{q}.lora_A.weight", f"{q}.lora_B.weight"], "shape mismatch"
    if kind == "incomplete pair":
        bad = dict(good)
        del bad[f"{q}.lora_B.weight"]
        return bad, [f"{q}.lora_A.weight"], "incomplete"
    if kind == "duplicate":
        extra = lora_state_dict(random_pairs(shapes, ["blocks.0.self_attn.q"]), "kohya")
        return good | extra, [next(iter(extra))], "a second"
    raise AssertionError(kind)


BAD_KINDS = [
    "unmatched",
    "bigger model",
    "text encoder",
    "full delta",
    "unknown suffix",
    "rank mismatch",
    "shape mismatch",
    "incomplete pair",
    "duplicate",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_are_rejected_naming_the_keys(dit: WanDiT, tmp_path: Path, kind: str) -> None:
    tensors, keys, phrase = _bad(dit, kind)
    path = write_lora(tmp_path / "bad.safetensors", tensors)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    manager = LoraManager(dit, source=LoraFiles())
    with pytest.raises(LoraError) as err:
        manager.apply([LoraSpec(path=str(path))])
    message = str(err.value)
    assert phrase in message and str(path) in message
    for key in keys:
        assert key in message and key in err.value.keys
    assert manager.in_force == () and all(torch.equal(v, dit.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("wrong", ["up", "down"])
def test_a_shape_mismatch_names_both_keys_and_the_wrong_half(dit: WanDiT, tmp_path: Path, wrong: str) -> None:
    shapes = linear_targets(dit)  # blocks.0.self_attn.q is [32, 32]
    tensors = lora_state_dict(random_pairs(shapes, ["blocks.0.self_attn.q"]), "wan-comfy")
    q = key_of("blocks.0.self_attn.q", "wan-comfy")
    down_key, up_key = f"{q}.lora_A.weight", f"{q}.lora_B.weight"
    if wrong == "up":
        tensors[up_key] = torch.zeros(48, 4)  # only the up half is for another width
    else:
        tensors[down_key] = torch.zeros(4, 48)
    with pytest.raises(LoraError) as err:
        load_lora(write_lora(tmp_path / "half.safetensors", tensors), shapes)
    bad_key, good_key = (up_key, down_key) if wrong == "up" else (down_key, up_key)
    half, other = ("up (B)", "down (A)") if wrong == "up" else ("down (A)", "up (B)")
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert err.value.keys == [bad_key]  # the fitting half is not reported as offending...
    assert lines == [
        f"{bad_key}: shape mismatch: the {half} half is {[48, 4] if wrong == 'up' else [4, 48]}, layer "
        f"blocks.0.self_attn.q [32, 32] (out, in) needs {[32, 4] if wrong == 'up' else [4, 32]}; its {other} "
        f"half {good_key} {[4, 32] if wrong == 'up' else [32, 4]} fits (a LoRA for another model size?)"
    ]  # ...but named in the message as its partner


def test_unreadable_and_empty_files(dit: WanDiT, tmp_path: Path) -> None:
    shapes = linear_targets(dit)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(LoraError, match="not a readable LoRA file"):
        load_lora(garbage, shapes)
    with pytest.raises(LoraError, match="no LoRA weights"):
        load_lora(write_lora(tmp_path / "empty.pt", {}), shapes)
    with pytest.raises(LoraError, match="not tensors: note"):
        load_lora(write_lora(tmp_path / "odd.pt", {"note": "hello"}), shapes)  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------------------------
# Where names point


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    (root / "styles").mkdir(parents=True)
    for name in ("a.safetensors", "styles/b.pt", "notes.txt"):
        (root / name).write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")  # outside the folder
    os.symlink(tmp_path / "secret.safetensors", root / "escape.safetensors")
    return root


def test_confined_names_stay_inside_the_lora_folder(lora_dir: Path) -> None:
    assert (
        resolve_lora_path("a.safetensors", lora_dir, confine=True) == (lora_dir / "a.safetensors").resolve()
    )
    assert resolve_lora_path("styles/b.pt", lora_dir, confine=True).name == "b.pt"
    outside = str(lora_dir.parent / "secret.safetensors")
    for name in (
        "../secret.safetensors",
        outside,
        "styles/../../secret.safetensors",
        "..\\secret.safetensors",
    ):
        with pytest.raises(LoraError, match="invalid LoRA name"):
            resolve_lora_path(name, lora_dir, confine=True)
    with pytest.raises(LoraError, match="outside the LoRA folder"):
        resolve_lora_path("escape.safetensors", lora_dir, confine=True)  # a link out of the folder
    with pytest.raises(LoraError, match=r"no LoRA 'missing\.safetensors'"):
        resolve_lora_path("missing.safetensors", lora_dir, confine=True)
    with pytest.raises(LoraError, match="not a LoRA file name"):
        resolve_lora_path("notes.txt", lora_dir, confine=True)
    with pytest.raises(LoraError, match="no LoRA folder is configured"):
        resolve_lora_path("a.safetensors", None, confine=True)


def test_command_line_names_are_paths_then_names_in_the_folder(lora_dir: Path, tmp_path: Path) -> None:
    direct = tmp_path / "secret.safetensors"
    assert resolve_lora_path(str(direct), None, confine=False) == direct
    assert resolve_lora_path("styles/b.pt", lora_dir, confine=False) == lora_dir / "styles" / "b.pt"
    # A Scope timeline saved on another machine: the absolute path is gone, the file name is in the folder.
    assert (
        resolve_lora_path("/home/someone/scope/a.safetensors", lora_dir, confine=False).name
        == "a.safetensors"
    )
    with pytest.raises(LoraError, match="WANSTREAM_LORA_DIR"):
        resolve_lora_path("nowhere.safetensors", None, confine=False)
