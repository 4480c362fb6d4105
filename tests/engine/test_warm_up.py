"""The warm-up stream (`Pipeline.warm_up`, run by `serve` while it loads, tests/server/test_model_warm_up.py):
a stream through every cache phase at the given settings, closed after."""

from __future__ import annotations

import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.settings import StreamSettings
from wanstream.engine.warm_up import chunks_to_fill, lane_classes
from wanstream.models.kv_cache import KVCache

SMALL = dict(height=32, width=48)


@pytest.mark.parametrize(
    "settings",
    [
        dict(SMALL),
        dict(SMALL, batching="none", steps=(700,)),
        dict(SMALL, mode="text"),
        dict(SMALL, steps=(800, 600, 400), kv_cache_frames=8),
    ],
    ids=["stream-batch", "no-batch", "text", "3-steps"],
)
def test_the_warm_up_runs_every_cache_phase_then_closes(
    demo_pipeline: Pipeline, settings: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions, plans = [], []
    real_session, real_plan = demo_pipeline.session, KVCache.plan

    def session(*args, **kwargs):
        sessions.append(real_session(*args, **kwargs))
        return sessions[-1]

    def plan(cache, starts, frames):
        plans.append((cache.config.capacity, real_plan(cache, starts, frames)))
        return plans[-1][1]

    monkeypatch.setattr(demo_pipeline, "session", session)
    monkeypatch.setattr(KVCache, "plan", plan)
    done = demo_pipeline.warm_up(**settings)
    (s,) = sessions
    full = StreamSettings.model_validate(settings)
    assert done.chunks == chunks_to_fill(full) and done.seconds > 0
    assert s.settings == full and s.closed == "warm-up done"
    # The last phase ran: a call whose every lane attended a full cache (and those before it, filling).
    lanes = len(full.denoising_steps) if full.batching == "stream" else 1
    assert any(p.lanes == lanes and min(p.valid) == capacity for capacity, p in plans)
    assert len({p.max_valid for _, p in plans}) > full.kv_cache_frames // 2  # the attended lengths grew
    assert not torch.is_inference_mode_enabled()  # the caller's mode is left as it was


@pytest.mark.parametrize(
    ("settings", "other"),
    [
        (dict(SMALL), (700,)),  # the default 2 steps: 2 lanes, then 1
        (dict(SMALL, steps=(900, 600, 300, 100)), (900,)),
        (dict(SMALL, steps=(500,)), (700, 500)),  # 1 lane, then 2
        (dict(SMALL, batching="none", steps=(700, 500)), None),  # one lane at any step count
    ],
)
def test_lane_classes_are_the_settings_and_one_of_the_other_compiled_graph(settings: dict, other) -> None:
    """One compiled graph for 1 lane, one for every count from 2 (models/fastpath.py): warming up both
    leaves no live steps change anything to compile."""
    base = StreamSettings.model_validate(settings)
    classes = lane_classes(base)
    assert classes[0] == base
    if other is None:
        assert classes == [base]
    else:
        (second,) = classes[1:]
        assert second.denoising_steps == other
        assert second.model_dump(exclude={"steps"}) == base.model_dump(exclude={"steps"})
