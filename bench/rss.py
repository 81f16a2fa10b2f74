"""Peak resident memory of this process while a block runs, sampled from ``/proc/self/statm`` in a thread."""

from __future__ import annotations

import os
import threading


class RssPeak:
    """Peak resident set size of this process while running, sampled in a background thread."""

    def __init__(self, period: float = 0.002):
        self.period = period
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.peak = 0

    def rss(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self._fd)

    @property
    def growth(self) -> int:
        return self.peak - self.base
