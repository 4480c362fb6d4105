"""The VACE on/off benchmark runs end to end at toy size on the CPU."""

from __future__ import annotations

import math

from wanstream.engine.vace import bench_vace


def test_bench_vace_measures_both_ways_at_toy_size() -> None:
    results = bench_vace("cpu", tiny=True, resolutions=((32, 48), (32, 32)), chunks=2, warm_chunks=1)
    assert [(r.resolution, r.vace) for r in results] == [
        ("32x48", False),
        ("32x32", False),
        ("32x48", True),
        ("32x32", True),
    ]
    for r in results:
        assert r.fps > 0 and r.chunk_ms_p50 > 0 and r.dit_ms_p50 > 0 and r.chunks_measured == 2
        assert math.isnan(r.peak_mem_gib)  # CUDA only
        assert math.isnan(r.vace_encode_ms_p50) != r.vace  # encode time only with VACE
