"""Both denoisers a session can be built with — one process and the ring — offer everything the session calls.

The session only talks to `ChunkDenoiser` / `DenoiserBackend` (engine/denoise/base.py); a change to those
protocols that one implementation misses fails here at once, without starting a ring.
"""

from __future__ import annotations

import inspect

import pytest

from wanstream.engine.denoise.base import ChunkDenoiser, DenoiserBackend
from wanstream.engine.denoise.local import Denoiser, LocalBackend
from wanstream.parallel.denoiser import RingBackend, RingDenoiser


def _members(protocol: type) -> dict[str, object]:
    names = {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)
    return {n: getattr(protocol, n, None) for n in names}


def _parameters(function: object) -> list[tuple[str, object]]:
    params = list(inspect.signature(function).parameters.values())[1:]  # without self
    return [(p.name, p.kind) for p in params]


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [
        (ChunkDenoiser, Denoiser),
        (ChunkDenoiser, RingDenoiser),
        (DenoiserBackend, LocalBackend),
        (DenoiserBackend, RingBackend),
    ],
)
def test_every_protocol_member_is_implemented_with_its_parameters(
    protocol: type, implementation: type
) -> None:
    instance_attributes = set(inspect.signature(implementation.__init__).parameters)
    for name, member in _members(protocol).items():
        if inspect.isfunction(member):
            implemented = getattr(implementation, name, None)
            assert inspect.isfunction(implemented), f"{implementation.__name__}.{name} is missing"
            wanted = [(n, k) for n, k in _parameters(member) if k != inspect.Parameter.KEYWORD_ONLY]
            got = [(n, k) for n, k in _parameters(implemented) if k != inspect.Parameter.KEYWORD_ONLY]
            assert len(got) >= len(wanted), (implementation, name)  # the session passes these by position
            keywords = {n for n, k in _parameters(member) if k == inspect.Parameter.KEYWORD_ONLY}
            assert keywords <= {n for n, _ in _parameters(implemented)}, (implementation, name)
        elif isinstance(member, property):
            assert isinstance(getattr(implementation, name, None), property), (implementation, name)
        else:  # a data attribute: a class attribute, a dataclass field, or set in __init__ from a parameter
            assert (
                hasattr(implementation, name)
                or name in getattr(implementation, "__dataclass_fields__", {})
                or name in instance_attributes
                or name in inspect.getsource(implementation.__init__)
            ), (implementation, name)
