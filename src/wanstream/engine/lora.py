"""LoRAs on the shared DiT: which are in force, at what scale, merged into the weights or run as adapters.

The DiT is shared by every session of a pipeline, so its LoRA state belongs to the components
(`components.loras`, one `LoraManager`). Each session asks for its own set (`StreamSettings.loras`)
before each chunk, under the manager's lock: `apply()` is a no-op when the set is already in force.

Two modes, per LoRA:

* **merged** — ΔW = Σ scale · alpha/rank · B·A is folded into the layer's weight, in place (so fused
  q/k/v tensors, compiled code and captured CUDA graphs see it): zero per-frame cost. The first merge
  into a layer keeps a copy of its original weight (on the CPU by default); every (re-)merge starts from
  that copy in float32 and rounds once, so scale changes never accumulate error, and unmerging copies it
  back: the original weights, bit for bit, in any dtype. A float8 layer (precision "fp8") keeps its float8
  values and row scales as that copy; each merge widens them, adds ΔW and re-quantises (new row scales).
* **runtime** — the layer becomes a `LoraLinear` that adds the adapters in the forward; their scales
  sit in a device tensor, so a scale change is one small in-place copy (no recompile, no re-capture).
  Adding or removing a runtime LoRA replaces modules: `structure` bumps and sessions drop their
  captured CUDA graphs. Self-attention q/k/v with adapters run as three GEMMs instead of one fused one.

`version` bumps whenever the DiT's function changes; sessions then recompute their cached text
keys/values (cross-attention projections of the prompt embeddings; the prompts are not re-encoded).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn

from wanstream.engine.settings import LoraMode, LoraSpec
from wanstream.models.fp8 import Fp8Linear, store_weight_, stored_weight, widened
from wanstream.models.lora import LoraError, LoraLinear, LoraPair, LoraWeights, linear_targets, replace_module

if TYPE_CHECKING:
    from wanstream.engine.components import Components

Backup = Literal["cpu", "device"]


class LoraSource(Protocol):
    """Where names the manager has not registered come from (`weights.lora.LoraFiles`: LoRA files)."""

    def __call__(self, name: str, targets: Mapping[str, tuple[int, int]]) -> LoraWeights: ...


@dataclass(frozen=True, eq=False)
class ActiveLora:
    name: str  # as the user gave it (the key of the spec)
    weights: LoraWeights
    scale: float
    mode: LoraMode


Plan = list[tuple[LoraPair, float]]  # a layer's adapters with their coefficients (scale · alpha/rank)


class LoraManager:
    """Puts a set of LoRAs on a DiT and takes them off again; thread-safe (`lock`)."""

    def __init__(
        self,
        dit: nn.Module,
        *,
        source: LoraSource | None = None,
        backup: Backup = "cpu",
    ) -> None:
        self.dit = dit
        self.source = source  # loads the LoRAs specs name (None: only registered names)
        self.backup = backup
        self.lock = threading.RLock()
        self.version = 0  # bumps when the DiT's function changes (weights, scales or adapters)
        self.structure = 0  # bumps when modules are replaced (runtime adapters added or removed)
        self._targets = linear_targets(dit)
        self._registered: dict[str, LoraWeights] = {}
        self._in_force: tuple[tuple[str, float, LoraMode], ...] = ()
        self._merged: dict[str, Plan] = {}  # layer → what is folded into its weight
        self._runtime: dict[str, Plan] = {}  # layer → its adapters
        self._backups: dict[str, tuple[torch.Tensor, ...]] = {}  # layer → original `stored_weight`
        # id(pair) → (pair, up, down on the DiT's device): re-merges (live scale changes) copy nothing small
        self._device_factors: dict[int, tuple[LoraPair, torch.Tensor, torch.Tensor]] = {}
        self._originals: dict[str, nn.Linear] = {}  # layer → the plain Linear a LoraLinear replaced
        self._fused: set[str] = set()  # self-attention modules whose q/k/v were fused before adapters

    # -- what is in force ----------------------------------------------------------------------------
    @property
    def in_force(self) -> tuple[tuple[str, float, LoraMode], ...]:
        """(name, scale, mode) of each LoRA on the DiT now."""
        return self._in_force

    def register(self, name: str, weights: LoraWeights) -> None:
        """Make in-memory LoRA weights addressable by `name` in specs (tests, benchmarks, Python users)."""
        with self.lock:
            unknown = [layer for layer in weights.pairs if layer not in self._targets]
            if unknown:
                raise LoraError(f"{name}: layers this model does not have: {', '.join(unknown[:8])}", unknown)
            self._registered[name] = weights

    def load(self, name: str) -> LoraWeights:
        """The LoRA a spec's path names: registered, else what the source loads for it (validated)."""
        with self.lock:
            if name in self._registered:
                return self._registered[name]
            if self.source is None:
                raise LoraError(f"no LoRA {name!r}: this pipeline has no LoRA files to look in (register it)")
            return self.source(name, self._targets)

    def prepare(self, specs: Sequence[LoraSpec], default_mode: LoraMode = "merged") -> list[ActiveLora]:
        """Load and validate every LoRA of `specs` (raises LoraError; nothing on the DiT changes)."""
        with self.lock:
            return [ActiveLora(s.path, self.load(s.path), s.scale, s.mode or default_mode) for s in specs]

    # -- changing the DiT ----------------------------------------------------------------------------
    def apply(self, specs: Sequence[LoraSpec], default_mode: LoraMode = "merged") -> bool:
        """Make the DiT carry exactly `specs`; False when it already did. A LoRA that cannot be loaded
        raises LoraError before anything changes."""
        wanted = tuple((s.path, float(s.scale), s.mode or default_mode) for s in specs)
        with self.lock:
            if wanted == self._in_force:
                return False
            active = self.prepare(specs, default_mode)
            merged: dict[str, Plan] = {}
            runtime: dict[str, Plan] = {}
            for lora in active:
                plans = merged if lora.mode == "merged" else runtime
                for layer, pair in lora.weights.pairs.items():
                    plans.setdefault(layer, []).append((pair, lora.scale * pair.factor))
            with torch.inference_mode(False), torch.no_grad():
                for layer in [*self._merged, *(k for k in merged if k not in self._merged)]:
                    self._merge(layer, merged.get(layer, []))
                in_use = {id(pair) for plan in merged.values() for pair, _ in plan}
                for key in [k for k in self._device_factors if k not in in_use]:
                    del self._device_factors[key]
                restructured = False
                for layer in [*self._runtime, *(k for k in runtime if k not in self._runtime)]:
                    restructured |= self._adapt(layer, runtime.get(layer, []))
                if restructured:
                    self._refuse_qkv()
                    self.structure += 1
            self._in_force = wanted
            self.version += 1
            return True

    def clear(self) -> bool:
        """Take every LoRA off (original weights restored exactly)."""
        return self.apply(())

    def _merge(self, layer: str, plan: Plan) -> None:
        if _same(self._merged.get(layer, []), plan, scales=True):
            return
        module = self.dit.get_submodule(layer)  # a LoraLinear shares its base layer's weight (and scales)
        stored = stored_weight(module)  # (weight,), or float8 (values, row scales)
        if layer not in self._backups:
            self._backups[layer] = tuple(self._backup(t) for t in stored)
        original = self._backups[layer]
        if not plan:
            for tensor, kept in zip(stored, original):
                tensor.copy_(kept, non_blocking=True)  # bit-exact restore
            del self._backups[layer], self._merged[layer]
            return
        # Never in place on the backup. From pinned memory the copy is asynchronous and in the weight's own
        # dtype (a re-merge of every layer, i.e. a live scale change, measured 1.0 s from pageable host memory
        # and 105 ms from pinned on an H100, where the adapters' factors were also copied on every merge).
        device = stored[0].device
        merged = widened(tuple(kept.to(device, copy=True, non_blocking=True) for kept in original))
        for pair, coef in plan:
            up, down = self._factors(pair, device)
            merged.addmm_(up, down, alpha=coef)
        # In place (a float8 layer re-quantised, its row scales too): fused q/k/v views, compiled code and
        # CUDA graphs see it.
        store_weight_(module, merged)
        self._merged[layer] = plan

    def _factors(self, pair: LoraPair, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair's (up, down) in float32 on `device`, copied there once per pair while it is in use."""
        if pair.up.device == device:
            return pair.up.float(), pair.down.float()
        held = self._device_factors.get(id(pair))
        if held is None or held[0] is not pair:
            held = (pair, pair.up.to(device, torch.float32), pair.down.to(device, torch.float32))
            self._device_factors[id(pair)] = held
        return held[1], held[2]

    def _backup(self, weight: torch.Tensor) -> torch.Tensor:
        if self.backup == "device":
            return weight.detach().clone()
        host = weight.detach().to("cpu", copy=True)
        return host.pin_memory() if weight.is_cuda else host

    def _adapt(self, layer: str, plan: Plan) -> bool:
        """Set a layer's runtime adapters; True when the module was replaced (not just rescaled)."""
        current = self._runtime.get(layer, [])
        if _same(current, plan, scales=False):
            if not _same(current, plan, scales=True):
                module = self.dit.get_submodule(layer)
                assert isinstance(module, LoraLinear)
                module.scales.copy_(_coefficients(plan).to(module.scales.dtype))
                self._runtime[layer] = plan
            return False
        if not plan:
            replace_module(self.dit, layer, self._originals.pop(layer))
            del self._runtime[layer]
            return True
        base = self._originals.get(layer)
        if base is None:
            base = self.dit.get_submodule(layer)
            assert type(base) in (nn.Linear, Fp8Linear), (
                f"{layer} is a {type(base).__name__}, not a plain layer"
            )
            self._note_fused(layer)
            self._originals[layer] = base
        # The adapters in the layer's compute dtype (a float8 layer's is the dtype it was loaded in).
        device, dtype = base.weight.device, getattr(base, "compute_dtype", base.weight.dtype)
        down = torch.cat([pair.down.to(device, dtype) for pair, _ in plan])
        up = torch.cat([pair.up.to(device, dtype) for pair, _ in plan], dim=1)
        scales = _coefficients(plan).to(device, dtype)
        replace_module(self.dit, layer, LoraLinear(base, down, up, scales))
        self._runtime[layer] = plan
        return True

    def _note_fused(self, layer: str) -> None:
        parent, _, child = layer.rpartition(".")
        module = self.dit.get_submodule(parent) if parent else None
        if child in ("q", "k", "v") and getattr(module, "_fused", None) is not None:
            self._fused.add(parent)

    def _refuse_qkv(self) -> None:
        """Self-attention that had fused q/k/v: unfused while an adapter sits on q, k or v, fused again
        (over the current, possibly merged, weights) once none does."""
        for parent in list(self._fused):
            if self.dit.get_submodule(parent).fuse_qkv():
                self._fused.discard(parent)


def _same(a: Plan, b: Plan, *, scales: bool) -> bool:
    return len(a) == len(b) and all(pa is pb and (not scales or ca == cb) for (pa, ca), (pb, cb) in zip(a, b))


def _coefficients(plan: Plan) -> torch.Tensor:
    """One coefficient per rank row: [R] float32 on the CPU."""
    return torch.cat([torch.full((pair.rank,), coef, dtype=torch.float32) for pair, coef in plan])


# ---------------------------------------------------------------------------------------------------------
# The components' manager


_CREATING = threading.Lock()  # two streams starting at once get the same manager


def lora_manager(components: Components) -> LoraManager:
    """The components' LoRA manager, created on first use (names load from `components.lora_source`)."""
    with _CREATING:
        if components.loras is None:
            components.loras = LoraManager(components.dit, source=components.lora_source)
        return components.loras


def configure_loras(components: Components, source: LoraSource | None) -> LoraManager:
    """Where the components' LoRA names are loaded from (`weights.lora.LoraFiles`: which folder, confined
    to it or not)."""
    components.lora_source = source
    manager = lora_manager(components)
    with manager.lock:
        manager.source = source
    return manager
