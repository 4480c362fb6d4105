"""One stream over several GPUs: DiT blocks split into a ring of ranks (pipeline parallel).

    from wanstream.parallel import ModelSource, Ring
    with Ring.start(ModelSource("files"), world=2) as ring:      # rank 0 here, rank 1 spawned
        session = ring.session(prompts=["a watercolor city"])     # the StreamSession API
        out = session.push(frames)

See docs/multigpu.md for the design and what is tested.
"""

from wanstream.parallel.launch import ModelSource, Ring
from wanstream.parallel.layout import split_blocks
from wanstream.parallel.ring import RingError, RingTimeout

__all__ = ["ModelSource", "Ring", "RingError", "RingTimeout", "split_blocks"]
