"""Helpers for tests that run `aemon run` as a real subprocess logging JSON to a file."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_until_ready(proc: subprocess.Popen, log: Path, offset: int = 0, timeout: float = 120) -> int:
    """Wait for the daemon's ``daemon.ready`` event (in ``log`` after byte ``offset``); return its HTTP port.

    Fails at once if the process exits first, and after ``timeout`` seconds otherwise.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
        for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
            if '"daemon.ready"' in line:
                return int(json.loads(line)["metrics_port"])
        time.sleep(0.1)
    raise AssertionError("daemon never became ready:\n" + log.read_text(errors="replace")[-5000:])
