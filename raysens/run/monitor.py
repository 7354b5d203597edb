"""Driver memory: this process's RSS sampled in a background thread while a sweep runs."""

from __future__ import annotations

import resource
import threading


class MemoryMonitor:
    """Samples this process's RSS every ``every_s`` seconds (peak, and the RSS at progress points)."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.every_s = every_s
        self.start_mb = self._rss()
        self.peak_mb = self.start_mb
        self.points: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="raysens-rss")

    def _rss(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=2)
        self.peak_mb = max(self.peak_mb, self._rss())

    def mark(self, samples: int) -> None:
        rss = self._rss()
        self.peak_mb = max(self.peak_mb, rss)
        self.points.append({"samples": int(samples), "rss_mb": round(rss, 1)})

    def summary(self) -> dict:
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
                "rss_end_mb": round(self._rss(), 1),
                "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_by_samples_done": self.points,
                "note": "driver process only (the Ray head's own processes and the actors are not included)"}
