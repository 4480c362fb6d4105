"""`serve` runs a private warm-up stream after loading (engine/warm_up.py): the model is "loaded" only after it,
or after it failed, which is never fatal. On the CPU nothing compiles, so the server skips it there; these tests
stand the GPU's condition in to see the stages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.settings import SettingsUpdate, StreamSettings
from wanstream.server import model as model_module
from wanstream.server.model import ModelManager

SMALL = dict(height=32, width=48)


@pytest.fixture(autouse=True)
def _torch_threads():
    """A CPU model's load leaves a core to the media path (torch's intra-op threads): restored after, as later
    tests in this process expect the process's own setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(
    monkeypatch: pytest.MonkeyPatch, warm_up, models: list | None = None
) -> tuple[ModelManager, list[str]]:
    monkeypatch.setattr(model_module, "compiles_at_stream_start", lambda pipeline: True)  # as on a GPU
    model = ModelManager(demo=True, models_dir=None, device="cpu", warm_up=warm_up)
    if models is not None:
        models.append(model)
    stages: list[str] = []
    set_stage = model._set_stage

    def spy(stage: str) -> None:
        stages.append(stage)
        set_stage(stage)

    monkeypatch.setattr(model, "_set_stage", spy)
    model.start_load()
    assert model.wait(120).state == "loaded", model.status().error
    return model, stages


def test_the_server_warms_up_before_it_says_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[StreamSettings] = []
    real = Pipeline.warm_up

    def warm_up(self, settings=None, **overrides):
        ran.append((settings, models[0].status().state))
        return real(self, settings, **overrides)

    monkeypatch.setattr(Pipeline, "warm_up", warm_up)
    settings = StreamSettings(height=32, width=48, steps=(700, 500, 300))
    models: list[ModelManager] = []
    one_step = settings.updated(SettingsUpdate(steps=(700,)))
    model, stages = _load(monkeypatch, lambda pipeline: [settings, one_step], models)
    # In order, before "loaded": no client's stream starts beside them.
    assert ran == [(settings, "loading"), (one_step, "loading")]
    assert any(s.startswith("compiling: a first stream at 48x32, 3 steps (1 of 2)") for s in stages), stages
    assert any(s.startswith("compiling: a first stream at 48x32, 1 step (2 of 2)") for s in stages), stages
    assert model.status().stage == "ready"


def test_a_failed_warm_up_still_loads_the_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def warm_up(self, settings=None, **overrides):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(Pipeline, "warm_up", warm_up)
    with caplog.at_level(logging.WARNING, logger="wanstream.server"):
        model, _ = _load(monkeypatch, lambda pipeline: [StreamSettings(**SMALL)] * 2)
    assert model.pipeline is not None and model.status().error is None
    assert any(
        "warm-up stream failed" in r.getMessage() and "9.00 GiB" in r.getMessage() for r in caplog.records
    )


def test_warm_up_settings_that_fail_still_load_the_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def settings(pipeline):
        return [StreamSettings(height=30)]  # not a multiple of 16: a ValidationError

    with caplog.at_level(logging.WARNING, logger="wanstream.server"):
        model, _ = _load(monkeypatch, settings)
    assert model.pipeline is not None and model.status().error is None
    assert any("warm-up stream failed (ValidationError" in r.getMessage() for r in caplog.records)


def test_no_warm_up_where_nothing_compiles() -> None:
    called = []
    model = ModelManager(demo=True, models_dir=None, device="cpu", warm_up=lambda p: called.append(p))
    model.start_load()
    assert model.wait(120).state == "loaded"
    assert called == []  # the CPU path compiles nothing: the settings were never even asked for


def test_the_server_warms_up_its_default_settings(tmp_path: Path) -> None:
    """`create_app`'s warm-up: the stream a client gets by default (with the command line's overrides), and the
    same at 1 step, so a live steps change to any count finds its compiled code (`warm_up.lane_classes`)."""
    from wanstream.server import ServerConfig, create_app

    common = dict(demo=True, device="cpu", preload=False, recordings_dir=tmp_path)
    config = ServerConfig(**common, settings_overrides={"height": 64, "width": 96})
    streams = create_app(config).state.model.warm_up(Pipeline.demo())
    assert [(s.height, s.width, len(s.denoising_steps)) for s in streams] == [(64, 96, 2), (64, 96, 1)]
    assert create_app(ServerConfig(**common, warm_up=False)).state.model.warm_up is None
