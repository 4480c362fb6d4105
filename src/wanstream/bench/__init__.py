"""`wanstream bench`: the pipeline's throughput, latency and memory on random weights (no download).

single.py measures one process (modes, resolutions, steps, codecs, LoRAs, VACE); ring.py one stream over N
GPUs against the same configurations on one; ring_check.py the ring's output against one process. Their
weights come from `engine.random_weights`, their p50 / p90 from `engine.measure.percentile` and their stage
times from `engine.measure.StageTimer`, as everywhere else.
"""
