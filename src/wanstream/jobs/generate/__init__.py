"""The offline job: an input video (or the built-in clip, or nothing in text mode) and prompts in, an MP4 out.

    from wanstream import Pipeline
    from wanstream.jobs.generate import GenerateRequest, generate

    request = GenerateRequest(input="in.mp4", timeline="examples/timeline-feline.json", output="out.mp4")
    result = generate(request, Pipeline.load())       # or Pipeline.demo(): tiny random weights
    print(result.stats.summary())

Two stages, so that nothing heavy happens before the input is known to be good: `plan(request)` validates
and decides everything, touching nothing on disk (planning.py: the rules); `run(plan, pipeline)` streams the
frames through a `StreamSession` and writes the MP4 (runner.py). The modules, each importing only those
before it: request (`GenerateRequest`) → vace (VACE inputs) → stats (measurements, formatting) → planning →
result (`GenerateResult`, the --stats-json file) → runner. This package exports the public API.
"""

from wanstream.jobs.generate.planning import GeneratePlan, plan
from wanstream.jobs.generate.request import GenerateError, GenerateRequest
from wanstream.jobs.generate.result import GenerateProgress, GenerateResult, GenerationInterrupted
from wanstream.jobs.generate.runner import generate, run

__all__ = [
    "GenerateError",
    "GeneratePlan",
    "GenerateProgress",
    "GenerateRequest",
    "GenerateResult",
    "GenerationInterrupted",
    "generate",
    "plan",
    "run",
]
