"""tools/gpu/live_path.py on the CPU: the demo server, a camera-like WebRTC client, the server's latencies and
bench's FPS for the same settings, in one JSON (the GPU run uses the same code with --random-weights)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu" / "live_path.py"


def _tool():
    spec = importlib.util.spec_from_file_location("live_path", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_path_measures_the_demo_server_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    _tool().main(
        ["--demo", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "1", "--codecs", "taehv",
         "--fps", "15", "--batching", "none", "--warm-s", "1", "--measure-s", "4", "--first-frame-s", "120", "--load-timeout-s", "120",
         "--bench-arg=--tiny", "--bench-arg=--chunks=2", "--bench-arg=--warm-chunks=1", "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert "demo" in data["label"].lower() and data["serve_exit"] == 0
    (phase,) = data["phases"]
    assert "error" not in phase, phase
    assert phase["received"] > 0 and phase["delivered_fps"] > 0 and phase["sent"] > 0
    for key in ("server_latency_p50_s", "server_latency_p90_s", "chunk_s_p50"):
        assert phase[key] is not None and 0 < phase[key] < math.inf, key
    assert phase["server_latency_p50_s"] <= phase["server_latency_p90_s"]
    assert set(phase["dropped"]) >= {"sent_minus_received", "sampled", "input_overflow"}
    assert phase["bench_fps"] > 0 and phase["delivered_over_bench"] > 0
    assert data["bench"]["fps"]["1"] == phase["bench_fps"]
    # The server ran the batching asked for, and bench measured the same (no batch: no lanes' lag).
    assert data["batching"] == phase["settings"]["batching"] == "none"
    assert any(part.startswith("nobatch,64x64,1,") for part in data["bench"]["command"])


def test_the_camera_moves_and_bad_steps_are_refused() -> None:
    import pytest

    tool = _tool()
    cam = tool.Camera(30, 48, 80)
    a, b = cam.image(0), cam.image(1)
    assert a.shape == (48, 80, 3) and a.dtype.name == "uint8" and (a != b).any()
    with pytest.raises(SystemExit):
        tool.parse(["--out", "x.json", "--steps", "5"])
