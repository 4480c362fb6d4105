"""What a client names: a sink (`{"kind": "ndi", "name": "wanstream"}`, `--sink ndi:wanstream`) or an NDI
input, validated before anything opens; and the sink each kind makes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wanstream.server.io.mpegts import MpegTsSink
from wanstream.server.io.ndi import NdiSink, parse_address
from wanstream.server.io.sinks import QueuedSink
from wanstream.server.io.texshare import SpoutSink, SyphonSink
from wanstream.server.io.virtualcam import VirtualCameraSink

SinkKind = Literal["ts", "ndi", "virtualcam", "spout", "syphon"]
SINK_TYPES: dict[str, type[QueuedSink]] = {
    "ts": MpegTsSink,
    "ndi": NdiSink,
    "virtualcam": VirtualCameraSink,
    "spout": SpoutSink,
    "syphon": SyphonSink,
}
MAX_SINKS = 8  # per session: each has a thread and a queue
NAME = r"^[^\x00-\x1f\x7f]+$"  # printable: it ends up in other programs' source lists


class SinkSpec(BaseModel):
    """One output of a session besides the browser."""

    model_config = ConfigDict(extra="forbid")

    kind: SinkKind = Field(
        ...,
        description="'ts': MPEG-TS at /sessions/{id}/output.ts; 'ndi': an NDI source; 'virtualcam': a "
        "virtual webcam; 'spout' (Windows) / 'syphon' (macOS): a shared GPU texture.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=NAME,
        description="NDI / Spout / Syphon sender name (default 'wanstream'); virtual camera device.",
    )
    queue: int = Field(8, ge=1, le=64, description="Frames this sink may queue before it drops its oldest.")

    @property
    def id(self) -> str:
        if self.kind in ("ndi", "spout", "syphon"):
            return f"{self.kind}:{self.name or 'wanstream'}"
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @classmethod
    def parse(cls, text: str) -> SinkSpec:
        """'KIND' or 'KIND:NAME' (the `--sink` flag's form)."""
        kind, _, name = text.partition(":")
        return cls.model_validate({"kind": kind, **({"name": name} if name else {})})

    def make(self) -> QueuedSink:
        return SINK_TYPES[self.kind](self.name, capacity=self.queue)


class NdiInput(BaseModel):
    """An NDI source to restyle: by name (as NDI discovery lists it) or by direct address."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, min_length=1, max_length=256, pattern=NAME, description="The source as listed: 'HOST (STREAM)'."
    )
    address: str | None = Field(
        None,
        min_length=3,
        max_length=262,
        description="HOST:PORT of the sender (no discovery needed), e.g. 127.0.0.1:5961.",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @model_validator(mode="after")
    def _one_given(self) -> NdiInput:
        if not (self.name or self.address):
            raise ValueError("an NDI input needs 'name' (found by discovery) or 'address' (HOST:PORT)")
        return self

    @classmethod
    def parse(cls, text: str) -> NdiInput:
        """The `--ndi-in` flag: an address when it looks like HOST:PORT, else a source name."""
        host, sep, port = text.rpartition(":")
        if sep and host and port.isdigit() and "(" not in text:
            return cls(address=text)
        return cls(name=text)

    @property
    def label(self) -> str:
        return f"ndi:{self.address or self.name}"
