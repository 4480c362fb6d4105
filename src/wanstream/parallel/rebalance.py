"""The one-shot block rebalancer: move DiT blocks off the ranks that also run the VAE.

Rank 0 encodes and the last rank decodes, so with equal block counts they are the slowest stages and
set the pace of the whole ring. After some steady batches every rank reports its median DiT time and
its total time per batch; StreamDiffusionV2's rule then gives each rank
    count + (mean(total) − total) / (Σ DiT time / blocks)
blocks (at least one, the sum fixed by taking from the largest or giving to the smallest), laid out
contiguously again. Blocks that change owner move with their weights and their KV-cache layer (the
ring is drained first, so every rank's cache bookkeeping is at the same batch); text K/V are rebuilt
from the conditionings every rank keeps.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from wanstream.models.kv_cache import KVCache
from wanstream.parallel.layout import Layout, from_counts, owner
from wanstream.parallel.ring import Link, RingError
from wanstream.parallel.stage import Absent, Stage, new_block

if TYPE_CHECKING:
    from wanstream.parallel.host import RingHost

_LAYER_BUFFERS = ("k", "v", "sink_k", "sink_v", "queue", "qhead", "qlen")


def balanced_counts(counts: Sequence[int], dit_ms: Sequence[float], total_ms: Sequence[float]) -> list[int]:
    """New block counts per rank from measured per-batch times (StreamDiffusionV2's rule)."""
    blocks = sum(counts)
    per_block = sum(dit_ms) / blocks
    if per_block <= 0:
        return list(counts)
    mean_total = statistics.fmean(total_ms)
    target = [max(1, round(c + (mean_total - t) / per_block)) for c, t in zip(counts, total_ms)]
    while sum(target) > blocks:
        i = max(range(len(target)), key=lambda r: target[r])
        target[i] -= 1
    while sum(target) < blocks:
        i = min(range(len(target)), key=lambda r: target[r])
        target[i] += 1
    return target


def measure(ring: RingHost) -> list[list[float]]:
    """[rank, blocks, DiT ms, total ms, batches, peak GiB] of every rank (times: medians over its recent
    steady batches; memory: NaN on a CPU)."""
    ring.quiesce()
    stats = [[*ring.clock.report(0, ring.stage.stop - ring.stage.start), ring.clock.peak_gib(ring.device)]]
    with ring.guarded():
        ring.link.send(1, {"kind": "measure", "stats": stats})
        header, _ = ring.link.recv(ring.world - 1, "measurements")
    return header["stats"]


def rebalance(ring: RingHost, layout: Sequence[Sequence[int]] | None = None) -> Layout:
    """Move blocks to `layout`, or (None) to the balanced layout from measured times; returns it.

    Runs between batches: what is in flight comes back first (and is kept), then every rank moves its
    blocks at once."""
    ring.ensure_ok()
    ring.quiesce()
    if layout is None:
        stats = measure(ring)
        if any(row[4] == 0 for row in stats):
            raise RingError(f"no steady batches measured on some rank yet: {stats}")
        counts = balanced_counts([int(r[1]) for r in stats], [r[2] for r in stats], [r[3] for r in stats])
        new = from_counts(counts)
    else:
        from wanstream.parallel.layout import check_layout

        new = check_layout(layout, ring.layout[-1][1], ring.world)
    if new == ring.layout:
        return new
    with ring.guarded():
        ring.link.send(1, {"kind": "relayout", "layout": [list(r) for r in new]})
        migrate(ring.stage, ring.layout, new, 0, ring.link)
        header, _ = ring.link.recv(ring.world - 1, "relayout acknowledgement")
    if header.get("kind") != "ack":
        raise ring.fail(
            f"ring protocol error: expected a relayout acknowledgement, got {header.get('kind')!r}"
        )
    ring.layout = new
    ring.clock.clear()
    return new


def migrate(stage: Stage, old: Layout, new: Layout, rank: int, link: Link) -> None:
    """This rank's part of a relayout: send the blocks it loses, receive the ones it gains (every rank
    walks the blocks in the same order, so each transfer's two sides meet), rebuild its cache."""
    start, stop = new[rank]
    cache = stage.cache
    received: dict[int, list[torch.Tensor]] = {}
    sent: list[torch.Tensor] = []  # on a GPU, kept alive until the transfers are done
    for block in range(old[-1][1]):
        src, dst = owner(old, block), owner(new, block)
        if src == dst or rank not in (src, dst):
            continue
        if rank == src:
            for t in _block_tensors(stage, block):
                sent.append(t.contiguous())
                _transfer(dist.isend(sent[-1], dst), link, f"sending block {block}")
            stage.dit.blocks[block] = Absent(block)
        else:
            template = new_block(stage.dit, stage.device, stage.dtype)
            layer_shapes = [] if cache is None else [getattr(cache, n)[0] for n in _LAYER_BUFFERS]
            tensors = []
            for like in [*template.state_dict().values(), *layer_shapes]:
                buf = torch.empty_like(like)
                _transfer(dist.irecv(buf, src), link, f"receiving block {block}")
                tensors.append(buf)
            n_params = len(template.state_dict())
            template.load_state_dict(dict(zip(template.state_dict().keys(), tensors[:n_params])))
            if stage.compiled:
                template.self_attn.fuse_qkv()
            stage.dit.blocks[block] = template
            received[block] = tensors[n_params:]
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)  # transfers run on the process group's streams
    sent.clear()
    if cache is not None:
        stage.cache = _relaid_cache(cache, stage.start, start, stop, received, stage.compiled)
    stage.start, stage.stop = start, stop
    stage.forget_cross()


def _block_tensors(stage: Stage, block: int) -> list[torch.Tensor]:
    tensors = list(stage.dit.blocks[block].state_dict().values())
    if stage.cache is not None:
        i = block - stage.start
        tensors += [getattr(stage.cache, n)[i] for n in _LAYER_BUFFERS]
    return tensors


def _relaid_cache(
    cache: KVCache,
    old_start: int,
    start: int,
    stop: int,
    received: dict[int, list[torch.Tensor]],
    compiled: bool,
) -> KVCache:
    """A cache over layers [start, stop): kept layers copied, received ones filled, same bookkeeping."""
    config = replace(cache.config, num_layers=stop - start)
    new = KVCache(config, total_steps=cache.host.total_steps, dtype=cache.k.dtype, device=cache.k.device)
    for block in range(start, stop):
        sources = received.get(block) or [getattr(cache, n)[block - old_start] for n in _LAYER_BUFFERS]
        for name, value in zip(_LAYER_BUFFERS, sources):
            getattr(new, name)[block - start].copy_(value)
    new.host = copy.deepcopy(cache.host)
    if compiled:
        new.compile()
    return new


def _transfer(work: Any, link: Link, what: str) -> None:
    if link.device.type == "cuda":
        work.wait()
        return
    try:
        work.wait(timedelta(seconds=link.timeout))
    except RuntimeError as exc:
        link.mailbox.alive()
        raise RingError(f"rank {link.rank}: {what} failed: {exc}") from exc
