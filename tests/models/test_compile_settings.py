"""The process's compile settings hold on every thread that compiles (`models.compile_settings`).

From torch 2.12 on, dynamo's and Inductor's config values are per context: a new thread starts from torch's
defaults. Set where the networks were optimised, a recompile limit (or Inductor's deterministic mode) did not
hold on the helper thread that compiles new shapes, nor on a server's engine thread: seen on the CPU with the
tiny networks compiled, "torch._dynamo hit config.recompile_limit (8)" on the helper after the limit had been
raised to 64 on the main thread.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from wanstream.models import compile_settings
from wanstream.models.fastpath import COMPILES, CompiledOrEager
from wanstream.takes import identity


@pytest.fixture(autouse=True)
def _restored():
    dynamo = torch._dynamo.config
    with (
        compile_settings.kept(),
        dynamo.patch(
            recompile_limit=dynamo.recompile_limit, error_on_nested_fx_trace=dynamo.error_on_nested_fx_trace
        ),
        inductor_config.patch(
            deterministic=inductor_config.deterministic,
            autotune_local_cache=inductor_config.autotune_local_cache,
        ),
    ):
        COMPILES.forget()
        yield
        assert COMPILES.wait(10)
        COMPILES.forget()


def _in_new_thread(fn: Callable[[], Any]) -> Any:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), name="fresh")
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return out["value"]


def _settings_here() -> tuple[str, int, bool, bool]:
    return (
        threading.current_thread().name,
        torch._dynamo.config.recompile_limit,
        torch._dynamo.config.error_on_nested_fx_trace,
        inductor_config.deterministic,
    )


def test_a_wanted_setting_is_in_force_at_once_and_in_a_new_thread_once_applied() -> None:
    compile_settings.want("torch._dynamo.config", "recompile_limit", 77)
    assert torch._dynamo.config.recompile_limit == 77

    def read() -> int:
        compile_settings.apply()
        return torch._dynamo.config.recompile_limit

    assert _in_new_thread(read) == 77
    with pytest.raises(AttributeError, match="does not exist"):
        compile_settings.want("torch._dynamo.config", "no_such_switch", 1)


def test_a_compiled_call_on_a_new_thread_runs_under_the_settings() -> None:
    """The stream's first shape compiles in line on whatever thread runs the stream (a server's engine thread)."""
    compile_settings.want("torch._inductor.config", "deterministic", True)
    seen: list[tuple] = []

    def compiled(x: torch.Tensor) -> torch.Tensor:  # stands in for the torch.compile'd function
        seen.append(_settings_here())
        return x + 1

    fn = CompiledOrEager(compiled, lambda x: x + 1, "test function")
    assert torch.equal(_in_new_thread(lambda: fn(torch.zeros(2))), torch.ones(2))
    assert len(seen) == 1
    thread, limit, nested_fx_raises, deterministic = seen[0]
    assert thread == "fresh"
    assert limit >= 64  # every signature of ours compiles once (dynamo's default allows 8)
    assert nested_fx_raises is False
    assert deterministic is True


def test_the_helper_thread_compiles_new_shapes_under_the_settings() -> None:
    compile_settings.want("torch._inductor.config", "deterministic", True)
    seen: list[tuple] = []

    def compiled(x: torch.Tensor) -> torch.Tensor:
        seen.append(_settings_here())
        return x * 2

    fn = CompiledOrEager(compiled, lambda x: x * 2, "test function", background=True)
    fn(torch.ones(2))  # the first shape: in line, on this thread
    with COMPILES.live_change():
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))  # eager now; compiles on the helper
    assert COMPILES.wait(10)
    helper = [s for s in seen if s[0] != threading.current_thread().name]
    assert len(helper) == 1
    _, limit, nested_fx_raises, deterministic = helper[0]
    assert limit >= 64 and nested_fx_raises is False and deterministic is True


@pytest.fixture
def _autotuner_restored(monkeypatch: pytest.MonkeyPatch) -> type:
    """Inductor's Triton autotuner, its timing restored after the test (`launch_configs_by_order` replaces it
    for the whole process)."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    monkeypatch.setattr(CachingAutotuner, "bench", CachingAutotuner.bench)
    return CachingAutotuner


def test_a_take_records_the_inductor_mode_the_compiles_use_not_this_threads(
    _autotuner_restored: type,
) -> None:
    """A take's identity is written on whatever thread saves the log; it records what the compiles ran with:
    untimed only with the deterministic mode wanted for every thread and the choice by order in force."""
    compile_settings.want("torch._inductor.config", "deterministic", True)
    assert _in_new_thread(identity._inductor_deterministic) is False  # the autotuner still times
    assert compile_settings.launch_configs_by_order() is True
    assert _in_new_thread(identity._inductor_deterministic) is True


def test_launch_configs_by_order_picks_each_kernels_first_configuration(_autotuner_restored: type) -> None:
    """The autotuner keeps the launcher with the least "time" (`min(timings, key=timings.get)`): by order, that
    is the kernel's first configuration, whatever this process would have timed — and no configuration timed by
    another process is read back from the compile cache. Idempotent."""
    autotuner = _autotuner_restored
    timed = autotuner.bench
    assert compile_settings.launch_configs_untimed() is False
    assert compile_settings.launch_configs_by_order() is True
    assert compile_settings.launch_configs_by_order() is True
    assert compile_settings.launch_configs_untimed() is True
    assert autotuner.bench is not timed

    kernel = types.SimpleNamespace(launchers=["XBLOCK 1024", "XBLOCK 512", "R0_BLOCK 512"])
    timings = {launcher: autotuner.bench(kernel, launcher) for launcher in kernel.launchers}
    assert timings == {"XBLOCK 1024": 0.0, "XBLOCK 512": 1.0, "R0_BLOCK 512": 2.0}
    assert min(timings, key=timings.get) == "XBLOCK 1024"
    assert autotuner.bench(kernel, "XBLOCK 64 (a tuning trial)") == float("inf")  # never replaces the first
    assert _in_new_thread(lambda: compile_settings.apply() or inductor_config.autotune_local_cache) is False
