"""The event loop's end of one worker process's pipe: framed, non-blocking reads and writes.

The process lane's workers (:mod:`tokengate.lanes.process_worker`) do their
I/O on the coordinator's event loop, not on a thread of their own: the loop
writes a batch of calls to the pipe and reads the replies when the pipe is
readable (``loop.add_reader``), so a call costs two hand-offs (loop → process
→ loop), as ``anyio.to_process`` does, instead of four through a worker thread.

Frames use :mod:`multiprocessing.connection`'s layout (a 4-byte big-endian
signed length, or -1 and an 8-byte length), which is what the child's
``Connection`` reads and writes. Writes never block the loop: what the pipe
does not take at once waits in a buffer, flushed when the pipe is writable.

Thread: everything here runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any, Callable

__all__ = ["Link"]

# Replies are read (os.readv) into one buffer allocated per pipe: a fresh 256 KiB bytes
# object per os.read cost 28.5 µs a read in a profile here against 11.5 µs (about a tenth
# of a trivial call's round trip); the large buffer keeps a burst's replies to few reads.
_READ_SIZE = 1 << 18
_HEADER = struct.Struct("!i")
_LONG = struct.Struct("!Q")


def frame(payload: bytes) -> bytes:
    """*payload* with its length header, as ``Connection.recv_bytes`` expects it."""
    n = len(payload)
    if n > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG.pack(n) + payload
    return _HEADER.pack(n) + payload


class Link:
    """A worker process's pipe, attached to an event loop.

    *fd* is the reply pipe (read), *wfd* the request pipe (written).
    *on_frames* gets every complete reply frame read (a list, in order);
    *on_dead* is called once the process's sentinel fires (the process is gone;
    call :meth:`drain` for the replies still in the pipe, then :meth:`detach`).
    ``states`` / ``lock`` are the process's shared slot states (see
    :mod:`tokengate.lanes._child`); ``pid`` its process id.
    """

    __slots__ = ("loop", "fd", "wfd", "sentinel", "states", "lock", "pid", "_in", "_out", "_on_frames", "_on_dead",
                 "_reading", "_writing", "_watching", "_rbuf", "_rview")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, wfd: int, sentinel: int, states: Any, lock: Any,
                 pid: int, on_frames: Callable[[list[bytes]], None], on_dead: Callable[[], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.wfd = wfd
        self.sentinel = sentinel
        self.states = states
        self.lock = lock
        self.pid = pid
        self._in = bytearray()
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._out = bytearray()
        self._on_frames = on_frames
        self._on_dead = on_dead
        os.set_blocking(fd, False)
        os.set_blocking(wfd, False)
        loop.add_reader(fd, self._readable)
        loop.add_reader(sentinel, self._died)
        self._reading = self._watching = True
        self._writing = False

    def send(self, payload: bytes) -> None:
        """Queue one frame; written now if the pipe takes it, else when it becomes writable."""
        data = frame(payload)
        if self._out:
            self._out += data
            return
        try:
            n = os.write(self.wfd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return  # the process is gone: its sentinel says how
        if n < len(data):
            self._out += memoryview(data)[n:]
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.wfd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self.wfd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = len(self._out)  # gone: drop what was queued
        del self._out[:n]
        if not self._out and self._writing:
            self._writing = False
            self.loop.remove_writer(self.wfd)

    def _readable(self) -> None:
        frames = self._read()
        if frames:
            self._on_frames(frames)

    def _read(self) -> list[bytes]:
        buf = self._in
        rbuf = [self._rbuf]
        while True:
            try:
                n = os.readv(self.fd, rbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if not n:  # EOF: the process closed its end (it is exiting); the sentinel follows
                if self._reading:
                    self._reading = False
                    self.loop.remove_reader(self.fd)
                break
            buf += self._rview[:n]
            if n < _READ_SIZE:
                break
        return self._frames()

    def _frames(self) -> list[bytes]:
        buf = self._in
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            start = pos + 4
            if n == -1:
                if end - pos < 12:
                    break
                (n,) = _LONG.unpack_from(buf, start)
                start += 8
            if end - start < n:
                break
            frames.append(bytes(buf[start:start + n]))
            pos = start + n
        if pos:
            del buf[:pos]
        return frames

    def _died(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self.sentinel)
            self._on_dead()

    def drain(self) -> list[bytes]:
        """After the process died: every complete reply frame still in the pipe (reads to EOF; never blocks)."""
        if not self._reading:
            return self._frames()
        frames: list[bytes] = []
        while self._reading:
            before = len(self._in)
            more = self._read()
            frames += more
            if self._reading and not more and len(self._in) == before:
                break  # nothing more now and no EOF: another process holds the other end open
        return frames

    def detach(self) -> None:
        """Stop watching the pipe and the sentinel (before the pipe is closed and its fd reused). Idempotent."""
        loop = self.loop
        if self._reading:
            self._reading = False
            loop.remove_reader(self.fd)
        if self._writing:
            self._writing = False
            loop.remove_writer(self.wfd)
        if self._watching:
            self._watching = False
            loop.remove_reader(self.sentinel)
        self._out.clear()
