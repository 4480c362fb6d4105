"""`wanstream serve`: the real-time WebRTC server and its REST/WebSocket control API."""

from wanstream.server.app import create_app
from wanstream.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
