"""`serve --reproducible-takes`: cuDNN's conv algorithms chosen by heuristics, the same in every process (on a
GPU a timed choice is the live process's own), and Inductor's deterministic mode asked for. The flag reaches the
loader, and a replay builds its networks as the take's were built. (The choice itself only acts on a GPU, and
is not all a bit-exact replay there needs: docs/replay.md, tools/gpu.)"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from wanstream import Pipeline
from wanstream.cli.main import build_parser
from wanstream.models import compile_settings
from wanstream.server import ServerConfig, create_app
from wanstream.takes.model import pipeline_for


def _capturing_random_weights(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def random_weights(cls, device=None, **kwargs) -> Pipeline:
        seen.update(kwargs, device=device)
        return Pipeline.demo()

    monkeypatch.setattr(Pipeline, "random_weights", classmethod(random_weights))
    return seen


def test_serve_reproducible_takes_reaches_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--reproducible-takes", "--random-weights"])
    assert args.reproducible_takes is True
    assert build_parser().parse_args(["serve"]).reproducible_takes is False  # speed by default
    seen = _capturing_random_weights(monkeypatch)
    config = ServerConfig(random_weights=True, device="cpu", reproducible_takes=True, preload=False)
    app = create_app(config)
    app.state.model.start_load()
    assert app.state.model.wait(60).state == "loaded"
    assert seen["reproducible"] is True


@pytest.mark.parametrize(("cudnn_benchmark", "reproducible"), [(False, True), (True, False), (None, False)])
def test_a_replay_builds_its_networks_as_the_take_chose_conv_algorithms(
    monkeypatch: pytest.MonkeyPatch, cudnn_benchmark: bool | None, reproducible: bool
) -> None:
    seen = _capturing_random_weights(monkeypatch)
    model = {"random_weights": True, "dtype": "float32", "device": "cpu", "cudnn_benchmark": cudnn_benchmark}
    pipeline_for(model)
    assert seen["reproducible"] is reproducible


def test_reproducible_optimisation_chooses_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, `optimize(reproducible=True)` turns off both timed choices: cuDNN's conv algorithms and
    Inductor's kernel configurations (each is a choice of the process that timed it). The demo networks stand
    in, their device relabelled as CUDA: nothing runs on the device here; the flags are the point."""
    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    # Process-wide switches: restored after the test.
    stack = contextlib.ExitStack()
    stack.enter_context(compile_settings.kept())  # what the optimisation wants for every thread that compiles
    stack.enter_context(
        inductor_config.patch(deterministic=False, autotune_local_cache=inductor_config.autotune_local_cache)
    )
    monkeypatch.setattr(CachingAutotuner, "bench", CachingAutotuner.bench)  # reproducible mode replaces it
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit))
    stack.enter_context(torch._dynamo.config.patch(error_on_nested_fx_trace=True))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with stack:
        _check_reproducible_switches(monkeypatch)


def _check_reproducible_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch._inductor.config as inductor_config

    from wanstream.takes import identity as identity_module

    components = Pipeline.demo().components
    components.device = torch.device("cuda")
    components.optimize(compile=False)
    # speed by default
    assert torch.backends.cudnn.benchmark is True and inductor_config.deterministic is False
    components.optimize(compile=False, reproducible=True)
    assert torch.backends.cudnn.benchmark is False and inductor_config.deterministic is True
    assert compile_settings.launch_configs_untimed() and inductor_config.autotune_local_cache is False
    monkeypatch.setattr(identity_module, "device_kind", lambda device: "Fake GPU")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    identity = identity_module.model_identity(components)
    assert identity["cudnn_benchmark"] is False and identity["inductor_deterministic"] is True
    assert identity["hash_seed"] == "0"
    monkeypatch.delenv("PYTHONHASHSEED")
    assert identity_module.model_identity(components)["hash_seed"] is None  # random in this process


def test_a_replay_in_another_process_says_why_optimised_frames_may_differ() -> None:
    """On the optimised GPU path another process's compiled code rounds otherwise (measured, cause open): a
    replay there must say so, also with --reproducible-takes; the take's own process and the eager path stay
    quiet (they replay bit for bit)."""
    from wanstream.takes.identity import differences

    base = {"device_kind": "NVIDIA H100", "cudnn_benchmark": False, "inductor_deterministic": True}
    take = {**base, "optimized": True, "process": "live"}
    elsewhere = differences(take, {**take, "process": "another"})
    assert len(elsewhere) == 1 and "optimised GPU path" in elsewhere[0] and "Replay take" in elsewhere[0]
    assert differences(take, take) == []  # the server that streamed it
    eager = {**base, "optimized": False, "process": "live"}
    assert differences(eager, {**eager, "process": "another"}) == []
    older = {**base, "process": "live"}  # a log from before the field: nothing is claimed
    assert differences(older, {**older, "optimized": True, "process": "another"}) == []
