"""LoRA files for the Wan DiT: read them, map every key to the DiT's own layer names, validate shapes.

Accepted (the layouts Wan2.1-T2V-1.3B LoRAs are shared in):

* pairs `<layer>.lora_down.weight` / `.lora_up.weight` (kohya, musubi-tuner), `.lora_A.weight` /
  `.lora_B.weight` (PEFT, diffusers, diffusion-pipe / ComfyUI) or `.lora.down.weight` / `.lora.up.weight`;
  an optional `<layer>.alpha` scales the pair by alpha / rank (no alpha: 1);
* layer names in the original Wan spelling (`blocks.0.self_attn.q`, `blocks.0.ffn.0`, `head.head`), in
  diffusers' `WanTransformer3DModel` spelling (`blocks.0.attn1.to_q`, `blocks.0.ffn.net.0.proj`,
  `proj_out`, `condition_embedder.time_proj`), or kohya's flattened form (`lora_unet_blocks_0_self_attn_q`,
  also `lora_transformer_…`);
* any of the prefixes `diffusion_model.`, `transformer.`, `model.`, `base_model.model.` (several may stack);
* `.safetensors`, or a torch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`, read with `weights_only=True`).

Nothing is dropped silently: a key that is not part of a pair, names no linear layer of this model, or
uses an unsupported kind of adapter (LoCon mid weights, LoHa/LoKr, DoRA, full `.diff` deltas) fails
the whole file with `LoraError`, which lists the offending keys. So do rank and shape mismatches
(e.g. a Wan2.1-14B LoRA, dim 5120, on the 1.3B model, dim 1536).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import torch

from wanstream.models.lora import LoraError, LoraPair, LoraWeights
from wanstream.weights.store import ENV_LORA_DIR, LORA_SUFFIXES

# Key endings → which half of a pair (longest first, so '.lora.down.weight' is not read as '.weight').
_PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# Inside a block: original Wan name → diffusers name.
_DIFFUSERS_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Adapter kinds that are recognisable but not supported: say so instead of "unknown key".
_UNSUPPORTED = (
    (re.compile(r"\.(diff|diff_b)$"), "a full weight/bias delta (.diff/.diff_b), not a low-rank pair"),
    (re.compile(r"\.dora_scale$"), "DoRA (weight-decomposed LoRA) is not supported"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon mid weights (conv LoRA) are not supported"),
    (re.compile(r"\.(hada_|lokr_)"), "LyCORIS LoHa/LoKr adapters are not supported"),
)
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\[\]-]{0,127}$")
_MAX_LISTED = 12
_CACHED_FILES = 8  # parsed LoRA files kept in memory (switching back to one does not re-read it)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_tensors(path: Path, shown: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a LoRA file (on the CPU); messages name the file as `shown` (default: the path)."""
    shown = shown or str(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LoraError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise LoraError(f"{shown}: is a folder, not a LoRA file") from None
    except Exception as exc:  # safetensors/pickle errors have many types; the file is unusable either way
        raise LoraError(f"{shown}: not a readable LoRA file ({type(exc).__name__})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]  # a training checkpoint: the weights are under "state_dict"
    if not isinstance(data, Mapping):
        raise LoraError(f"{shown}: expected a dict of tensors, found {type(data).__name__}")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraError(f"{shown}: entries that are not tensors: {_listing(bad)}", bad)
    return dict(data)


def load_lora(
    path: str | Path, targets: Mapping[str, tuple[int, int]], name: str | None = None
) -> LoraWeights:
    """Read and normalise a LoRA file for a model whose linear layers are `targets` (name → (out, in)).
    `name` is how messages (and `LoraWeights.source`) call the file (default: its path)."""
    path = Path(path)
    shown = name or str(path)
    return parse_lora(read_tensors(path, shown), targets, source=shown)


class LoraFiles:
    """LoRA names → loaded weights, the source a `LoraManager` asks for names it has not registered.

    A name is resolved by `resolve_lora_path` against `lora_dir` (`confine=True`: only inside it, the
    server's rule for names clients send). `from_env()` reads the folder from WANSTREAM_LORA_DIR at each
    look-up (generate and Python users). Parsed files are cached by (path, mtime, size): switching back to
    a LoRA does not re-read it, a rewritten file is read again. Not thread-safe: the manager calls it under
    its lock."""

    def __init__(self, lora_dir: str | Path | None = None, *, confine: bool = False) -> None:
        self._lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None
        self._from_env = False
        self.confine = confine
        self._cache: OrderedDict[tuple[str, int, int], LoraWeights] = OrderedDict()

    @classmethod
    def from_env(cls) -> LoraFiles:
        files = cls()
        files._from_env = True
        return files

    @property
    def lora_dir(self) -> Path | None:
        if self._from_env:
            folder = os.environ.get(ENV_LORA_DIR)
            return Path(folder).expanduser() if folder else None
        return self._lora_dir

    def __call__(self, name: str, targets: Mapping[str, tuple[int, int]]) -> LoraWeights:
        """The parsed LoRA `name` refers to, for a model whose linear layers are `targets`; LoraError."""
        path = resolve_lora_path(name, self.lora_dir, confine=self.confine)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        weights = self._cache.get(key)
        if weights is None:
            # Confined (the server): messages go back to clients, so name the file as they did.
            weights = load_lora(path, targets, name=name if self.confine else None)
            self._cache[key] = weights
            while len(self._cache) > _CACHED_FILES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return weights


# ---------------------------------------------------------------------------------------------------------
# Key normalisation


def layer_aliases(targets: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted alias → layer, kohya flattened alias → layer) for the model's layer names."""
    dotted: dict[str, str] = {}
    for name in targets:
        dotted[name] = name
        match = re.fullmatch(r"(blocks\.\d+)\.(.+)", name)
        if match and match[2] in _DIFFUSERS_BLOCK:
            dotted[f"{match[1]}.{_DIFFUSERS_BLOCK[match[2]]}"] = name
        elif name in _DIFFUSERS_TOP:
            dotted[_DIFFUSERS_TOP[name]] = name
    flat = {alias.replace(".", "_"): name for alias, name in dotted.items()}
    return dotted, flat


def _strip_prefixes(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if module.startswith(prefix):
                module, changed = module[len(prefix) :], True
    return module


def parse_lora(
    tensors: Mapping[str, torch.Tensor], targets: Mapping[str, tuple[int, int]], source: str = "LoRA"
) -> LoraWeights:
    """Map a LoRA state dict onto the model's layers; raises LoraError naming every offending key."""
    dotted, flat = layer_aliases(targets)
    blocks = len({name.split(".")[1] for name in targets if name.startswith("blocks.")})
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    naming: set[str] = set()
    problems: list[tuple[str, str]] = []  # (key, what is wrong)
    for key, tensor in tensors.items():
        part = next(((end, kind) for end, kind in _PARTS if key.endswith(end)), None)
        if part is None:
            why = next((msg for pattern, msg in _UNSUPPORTED if pattern.search(key)), None)
            problems.append(
                (key, why or "not a LoRA weight (expected .lora_A/.lora_B/.lora_down/.lora_up/.alpha)")
            )
            continue
        end, kind = part
        module = _strip_prefixes(key[: -len(end)])
        kohya = next((p for p in _KOHYA_PREFIXES if module.startswith(p)), None)
        layer = flat.get(module[len(kohya) :]) if kohya else dotted.get(module)
        if layer is None:
            problems.append((key, _unmatched(module, blocks)))
            continue
        naming.add("kohya" if kohya else "wan" if module == layer else "diffusers")
        slot = parts.setdefault(layer, {})
        if kind in slot:
            problems.append((key, f"a second {kind} for layer {layer} (also {slot[kind][0]})"))
            continue
        slot[kind] = (key, tensor)
    pairs: dict[str, LoraPair] = {}
    for layer, slot in parts.items():
        pair = _pair(layer, slot, targets[layer], problems)
        if pair is not None:
            pairs[layer] = pair
    if problems:
        raise LoraError(_problem_message(source, problems), [k for k, _ in problems])
    if not pairs:
        raise LoraError(f"{source}: no LoRA weights in the file")
    order = {name: i for i, name in enumerate(targets)}
    pairs = dict(sorted(pairs.items(), key=lambda kv: order[kv[0]]))
    return LoraWeights(source, pairs, tuple(sorted(naming)))


def _unmatched(module: str, blocks: int) -> str:
    found = re.search(r"blocks[._](\d+)[._]", module)
    if found and int(found[1]) >= blocks:
        return f"matches no layer: this model has {blocks} blocks (a LoRA for a larger model, e.g. 14B?)"
    if re.match(r"(lora_te|text_encoder|te_|lora_te\d)", module):
        return "adapts a text encoder; only the DiT takes LoRAs here"
    return "matches no linear layer of this model"


def _pair(
    layer: str,
    slot: dict[str, tuple[str, torch.Tensor]],
    shape: tuple[int, int],
    problems: list[tuple[str, str]],
) -> LoraPair | None:
    """Validate one layer's down/up/alpha; append what is wrong to `problems`."""
    keys = [k for k, _ in slot.values()]
    if "down" not in slot or "up" not in slot:
        missing = "up (B)" if "down" in slot else "down (A)" if "up" in slot else "down and up"
        problems += [(k, f"its pair is incomplete: no {missing} weight for layer {layer}") for k in keys]
        return None
    (down_key, down), (up_key, up) = slot["down"], slot["up"]
    if not (down.is_floating_point() and up.is_floating_point()):
        problems.append((down_key, f"LoRA weights must be floating point, got {down.dtype} / {up.dtype}"))
        return None
    if down.dim() != 2 or up.dim() != 2:
        problems.append(
            (down_key, f"expected 2-D matrices, got down {tuple(down.shape)} and up {tuple(up.shape)}")
        )
        return None
    out_f, in_f = shape
    if down.shape[0] != up.shape[1]:
        problems.append(
            (down_key, f"rank mismatch: down has rank {down.shape[0]}, {up_key} has rank {up.shape[1]}")
        )
        return None
    if down.shape[0] == 0:
        problems.append((down_key, "rank 0"))
        return None
    down_ok, up_ok = down.shape[1] == in_f, up.shape[0] == out_f
    if not (down_ok and up_ok):
        # One line per wrong half, each naming the other key of its pair and whether that one fits.
        rank = down.shape[0]
        halves = (
            ("down (A)", down_key, down, down_ok, [rank, in_f], "up (B)", up_key, up, up_ok),
            ("up (B)", up_key, up, up_ok, [out_f, rank], "down (A)", down_key, down, down_ok),
        )
        for half, key, w, ok, needed, other, other_key, other_w, other_ok in halves:
            if not ok:
                problems.append(
                    (
                        key,
                        f"shape mismatch: the {half} half is {list(w.shape)}, layer {layer} [{out_f}, {in_f}] "
                        f"(out, in) needs {needed}; its {other} half {other_key} {list(other_w.shape)} "
                        + ("fits" if other_ok else "is wrong too")
                        + " (a LoRA for another model size?)",
                    )
                )
        return None
    alpha = None
    if "alpha" in slot:
        alpha_key, a = slot["alpha"]
        if a.numel() != 1 or not math.isfinite(float(a.reshape(-1)[0])):
            problems.append((alpha_key, f"alpha must be one finite number, got shape {tuple(a.shape)}"))
            return None
        alpha = float(a.reshape(-1)[0])
    return LoraPair(down=down, up=up, alpha=alpha)


def _problem_message(source: str, problems: list[tuple[str, str]]) -> str:
    lines = [f"{key}: {why}" for key, why in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"... and {len(problems) - _MAX_LISTED} more")
    return f"{source}: {len(problems)} unusable key(s); the LoRA was not applied:\n  " + "\n  ".join(lines)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------------------
# Where a LoRA named by a user lives


def resolve_lora_path(name: str, lora_dir: Path | None, *, confine: bool) -> Path:
    """The file a LoRA `name` refers to, or LoraError.

    `confine=True` (the server: names come from clients): `name` must be a plain relative name inside
    `lora_dir` (no `..`, no absolute path; symlinks followed must stay inside), and nothing outside the
    folder is ever opened or tested for existence. `confine=False` (command line, Python): a path as
    given (absolute, or relative to the working folder), else `lora_dir/name`, else `lora_dir/<file name>`.
    """
    if not name or len(name) > 1024 or "\x00" in name:
        raise LoraError(f"invalid LoRA name {name!r}")
    if confine:
        return _confined(name, lora_dir)
    tried = [Path(name).expanduser()]
    if lora_dir is not None:
        tried += [lora_dir / name, lora_dir / Path(name).name]
    for path in tried:
        if path.is_file():
            return _check_suffix(path)
    where = ", ".join(dict.fromkeys(str(p) for p in tried))
    hint = "" if lora_dir is not None else " (set WANSTREAM_LORA_DIR to look names up in a LoRA folder)"
    raise LoraError(f"LoRA file {name!r} not found (looked at {where}){hint}")


def _confined(name: str, lora_dir: Path | None) -> Path:
    if lora_dir is None:
        raise LoraError("no LoRA folder is configured on this server (start it with --lora-dir DIR)")
    pure = PurePosixPath(name)
    if (
        "\\" in name
        or pure.is_absolute()
        or not pure.parts
        or any(part in (".", "..") or not _SAFE_PART.match(part) for part in pure.parts)
    ):
        raise LoraError(
            f"invalid LoRA name {name!r}: use a name relative to the LoRA folder, e.g. 'style.safetensors' "
            "(no '..', no absolute paths; GET /api/v1/loras lists them)"
        )
    base = lora_dir.resolve()
    path = (base / pure).resolve()
    if not path.is_relative_to(base) or path == base:
        raise LoraError(f"{name!r} points outside the LoRA folder")
    if not path.is_file():
        raise LoraError(f"no LoRA {name!r} in the LoRA folder (GET /api/v1/loras lists them)")
    return _check_suffix(path, shown=name)


def _check_suffix(path: Path, shown: str | None = None) -> Path:
    if path.suffix.lower() not in LORA_SUFFIXES:
        allowed = ", ".join(LORA_SUFFIXES)
        raise LoraError(f"{shown or path}: not a LoRA file name (use one of {allowed})")
    return path
