"""Takes: a live session's log saved to one file, and replayed offline bit for bit.

`log.py` is the file format (docs/replay.md), `frames.py` how frames are kept losslessly (FFV1) and the
server's on-disk store, `identity.py` what "the same model" means, `replay.py` running a log again.
"""

from wanstream.takes.log import (
    LOG_FORMAT,
    LOG_VERSION,
    LogError,
    TakeLog,
    journal_log,
    load_log,
    log_header,
    save_log,
    write_log,
)
from wanstream.takes.replay import ReplayReport, replay

__all__ = [
    "LOG_FORMAT",
    "LOG_VERSION",
    "LogError",
    "ReplayReport",
    "TakeLog",
    "journal_log",
    "load_log",
    "log_header",
    "replay",
    "save_log",
    "write_log",
]
