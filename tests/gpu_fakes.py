"""GPU readers for tests: none at all, or canned readings (kvproxy.telemetry.gpu takes its reader as a
parameter, so both branches of the collector and the monitor run on any machine)."""

from __future__ import annotations

import os
import threading

from kvproxy.telemetry.gpu import GpuReading


class NoGpu:
    def open(self) -> bool:
        return False

    def read(self) -> list[GpuReading]:
        raise AssertionError("never read without a GPU")

    def close(self) -> None:
        raise AssertionError("never closed without a GPU")


class CannedGpu:
    """One H200-sized GPU on which this process uses ``own_bytes``; records how it was called."""

    def __init__(self, own_bytes: int = 3 * 2**30) -> None:
        self.own_bytes = own_bytes
        self.opens = self.reads = self.closes = 0
        self.read_threads: set[int] = set()

    def open(self) -> bool:
        self.opens += 1
        return True

    def read(self) -> list[GpuReading]:
        self.reads += 1
        self.read_threads.add(threading.get_ident())
        return [GpuReading(0, "NVIDIA H200", "GPU-0", 30 * 2**30, 140 * 2**30, {os.getpid(): self.own_bytes})]

    def close(self) -> None:
        self.closes += 1
