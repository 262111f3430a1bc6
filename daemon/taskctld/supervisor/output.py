"""An attempt's output: a pipe's read end copied into a capped log file."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

READ_SIZE = 65536
STDERR_TAIL = 4096  # bytes of stderr kept to explain a failure (memory limit)


@dataclass
class LogSink:
    """One output stream: a pipe's read end copied into a log file, up to a cap. The file is
    created on the first byte: silent tasks cost no files."""

    fd: int
    path: str
    cap: int
    out: int = -1
    written: int = 0
    discarded: int = 0
    tail: bytes = b""  # the last bytes seen (stderr), to explain a failure
    keep_tail: bool = False
    broken: str | None = None  # why the log cannot be written (a full disk): output is dropped

    def pump(self) -> bool:
        """Copy what is available; False once the pipe is at its end. The pipe is always
        drained, whatever happens to the file, so the command never blocks on its output."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        if self.keep_tail:
            self.tail = (self.tail + data)[-STDERR_TAIL:]
        if self.broken is None:
            try:
                self._store(data)
            except OSError as e:
                self.broken = e.strerror or str(e)
        return True

    def _store(self, data: bytes) -> None:
        if self.out < 0:
            self.out = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        room = self.cap - self.written
        if room > 0:
            os.write(self.out, data[:room])
            self.written += min(room, len(data))
        if len(data) > room:
            if self.discarded == 0:
                notice = f"\n[taskctl: output truncated: the cap of {self.cap} bytes was reached]\n"
                os.write(self.out, notice.encode())
            self.discarded += len(data) - max(room, 0)

    def close(self) -> None:
        for fd in (self.fd, self.out):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
