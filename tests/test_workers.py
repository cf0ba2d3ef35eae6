"""AEMON_WORKERS: one `aemon run` with worker processes, as a real process tree (aemon.workers)."""

from __future__ import annotations

import os
import re
import signal
import time

from daemon_process import Daemon, by_item, new_root, records, wait_records, write_png


def _wait_event(daemon: Daemon, name: str, n: int = 1, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(found := daemon.events(name)) < n:
        assert time.monotonic() < deadline, f"no {name} event:\n{daemon.text()}"
        time.sleep(0.1)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fp:  # a zombie is not alive
        return fp.read().split(") ")[1][0] != "Z"


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_workers_share_the_work_and_the_metrics(tmp_path, digits):
    """Two processes: every item once, /metrics sums both, SIGHUP reaches the worker, SIGTERM stops both."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2"}).wait_ready()
    try:
        assert daemon.events("daemon.ready")[0]["workers"] == 2
        (started,) = _wait_event(daemon, "worker.started")
        _wait_event(daemon, "worker.ready")
        names = [f"w-{i:03d}.png" for i in range(120)]
        for i, name in enumerate(names):
            write_png(root / "inbox" / name, digits[i])
            if i % 30 == 29:
                time.sleep(0.3)
        wait_records(root, len(names), daemon)
        time.sleep(1.0)
        seen = by_item(root)
        assert sorted(seen) == names and all(len(v) == 1 for v in seen.values())
        code, text = daemon.get("/metrics")
        assert code == 200
        total = sum(_metric(text, "aemon_items_total", f'{{verdict="{v}"}}') for v in ("ok", "anomaly", "rejected"))
        assert total == len(names)
        assert _metric(text, "aemon_reconstruction_error_count") == len(names)
        assert _metric(text, "aemon_anomaly_threshold") > 0
        assert _metric(text, "aemon_processes") == 2
        assert 'aemon_model_info{' in text
        daemon.proc.send_signal(signal.SIGHUP)
        loaded = _wait_event(daemon, "bundle.loaded", n=4)  # two at start-up, two on reload
        assert {e.get("worker", 0) for e in loaded[2:]} == {0, 1}
    finally:
        assert daemon.stop() == 0, daemon.text()
    assert not _alive(started["pid"])
    (main,), (worker,) = daemon.events("daemon.stopped"), daemon.events("worker.stopped")
    assert main["ok"] + main["anomaly"] + worker["ok"] + worker["anomaly"] == len(names)
    assert worker["worker"] == 1 and all(e["worker"] == 1 for e in daemon.events("item.decided") if "worker" in e)
    assert len(records(root)) == len(names)
    assert os.listdir(root / ".aemon" / "claims") == []


def test_workers_stop_when_the_main_process_is_killed(tmp_path, digits):
    """A SIGKILL of the main process stops its worker too; a new daemon finishes whatever was claimed."""
    root = new_root(tmp_path)
    log = tmp_path / "daemon.log"
    daemon = Daemon(root, log, env={"AEMON_WORKERS": "2"}).wait_ready()
    (started,) = _wait_event(daemon, "worker.started")
    _wait_event(daemon, "worker.ready")
    for i in range(40):
        write_png(root / "inbox" / f"k-{i:02d}.png", digits[i])
    daemon.kill()
    deadline = time.monotonic() + 30
    while _alive(started["pid"]):
        assert time.monotonic() < deadline, "the worker outlived its main process"
        time.sleep(0.1)
    again = Daemon(root, log).wait_ready()
    try:
        wait_records(root, 40, again)
        time.sleep(1.0)
        assert all(len(v) == 1 for v in by_item(root).values()) and len(by_item(root)) == 40
    finally:
        assert again.stop() == 0, again.text()
