"""The error a stream's session raises for anything it refuses or cannot do."""


class SessionError(RuntimeError):
    pass
