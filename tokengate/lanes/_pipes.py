"""The parent's ends of a worker process's two one-way pipes, used as one duplex connection (:class:`PipePair`).

Made and owned by :class:`~tokengate.lanes.process.ChildProcess` (one pair per
process it starts); a pipelined user reaches the file descriptors through
:meth:`ChildProcess.endpoints <tokengate.lanes.process.ChildProcess.endpoints>`.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

__all__ = ["PipePair"]


class PipePair:
    """The parent's ends of a worker process's two pipes, used as one duplex ``Connection``.

    Reads (and readiness: :meth:`fileno`) are on the reply pipe, writes on the
    request pipe; the child's end of the reply pipe closes when it dies (EOF).
    """

    __slots__ = ("reader", "writer")

    def __init__(self, reader: Connection, writer: Connection) -> None:
        self.reader = reader
        self.writer = writer

    def fileno(self) -> int:
        """The reply pipe's fd (what a wait for a reply watches)."""
        return self.reader.fileno()

    def write_fileno(self) -> int:
        """The request pipe's fd."""
        return self.writer.fileno()

    def send_bytes(self, payload: bytes) -> None:
        """Send one framed request (blocking)."""
        self.writer.send_bytes(payload)

    def recv_bytes(self) -> bytes:
        """Receive one framed reply (blocking)."""
        return self.reader.recv_bytes()

    def close(self) -> None:
        """Close both ends (an idle child exits when its request pipe closes)."""
        for end in (self.writer, self.reader):
            try:
                end.close()
            except OSError:
                pass

