"""`wanstream generate --gpus N`: the ring behind the CLI (CPU processes with --device cpu)."""

from __future__ import annotations

from pathlib import Path

import torch

from wanstream.cli.main import main
from wanstream.media.video import read_video


def _generate(tmp_path: Path, name: str, *extra: str) -> int:
    args = ["generate", "--demo", "--models-dir", str(tmp_path / "no-models"), "-o", str(tmp_path / name)]
    args += ["--frames", "21", "--height", "32", "--width", "48", "--seed", "3", "--prompt", "a red fox"]
    return main([*args, *extra])


def test_generate_on_two_cpu_processes_writes_the_same_video(
    tmp_path: Path, one_torch_thread, capsys
) -> None:
    assert _generate(tmp_path, "one.mp4") == 0
    assert _generate(tmp_path, "ring.mp4", "--gpus", "2", "--device", "cpu") == 0
    assert "2-rank ring (cpu)" in capsys.readouterr().err
    one, _, _ = read_video(tmp_path / "one.mp4")
    ring, _, _ = read_video(tmp_path / "ring.mp4")
    assert one.shape == ring.shape == (21, 32, 48, 3)
    assert torch.equal(one, ring)


def test_more_gpus_than_the_machine_has_is_a_clear_error(tmp_path: Path, capsys) -> None:
    if torch.cuda.device_count() >= 64:
        return
    assert _generate(tmp_path, "x.mp4", "--gpus", "64") == 2
    err = capsys.readouterr().err
    assert "--gpus 64" in err and "CUDA GPU(s)" in err and "--device cpu" in err
    assert not (tmp_path / "x.mp4").exists()
    assert _generate(tmp_path, "x.mp4", "--gpus", "0") == 2
