"""The README's code runs as written, so it cannot drift from the API.

The Python block is taken from README.md verbatim and executed with one stand-in: `Pipeline.load()` (which
needs the downloaded weights) returns the demo pipeline. Everything else — the helpers the README defines,
numpy frames in, a string prompt, the printed output shapes — is the README's own code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wanstream import Pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # the README's own 832×480 with the tiny Wan VAE: about a minute on two cores
def test_the_readme_python_block_runs_as_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "the README has one Python example; this test runs it"
    demo = Pipeline.demo()
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *args, **kwargs: demo))
    namespace: dict = {"__name__": "readme"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    shapes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torch.Size")]
    # Two pushes of 4 frames (the first chunk needs 5: nothing out yet, then 5 out) and the flush (the rest).
    sizes = [int(re.match(r"torch.Size\(\[(\d+), 480, 832, 3\]\)", s).group(1)) for s in shapes]
    assert len(sizes) == 3 and sum(sizes) == 8, shapes
    session = namespace["session"]
    assert session.settings.noise_scale == 0.6 and session.settings.seed == 7
    assert session.prompt.describe() == (("a watercolor city at dusk", 1.0),)
