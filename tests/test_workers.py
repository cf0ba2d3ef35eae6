"""AEMON_WORKERS: one `aemon run` with worker processes, as a real process tree (aemon.workers)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_process import (
    Daemon,
    by_item,
    finish_and_stop,
    full_tmpfs,
    full_tmpfs_fill,
    half_written,
    items,
    new_root,
    records,
    wait_records,
    write_png,
)


def _records_after(daemon: Daemon, root: Path, digits: np.ndarray) -> list[dict]:
    """Drop 40 digits into the running ``daemon`` and wait for their records; every record of the root."""
    for i in range(40):
        write_png(root / "inbox" / f"after-{i:02d}.png", digits[i])
    wait_records(root, 40, daemon)
    return [json.loads(p.read_text()) for p in records(root)]


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


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is stopped (a SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout

    def running() -> bool:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/task/{task}/stat").read_text().split(") ")[1][0] not in "tT":
                    return True
        return False

    while running():
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


def _mapped_packages(pid: int) -> set[str]:
    """Top-level packages under a site-packages folder with a file mapped into process ``pid`` (its extensions)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        _, sep, rest = line.partition("/site-packages/")
        if sep:
            found.add(rest.split("/")[0])
    return found


_LOGGER = """
import sys
from aemon.logs import configure, get_logger
configure("json", worker=int(sys.argv[1]))
log = get_logger()
for i in range(20_000):
    log.info("item.decided", item=f"{i:06d}.png", verdict="ok", score=0.5)
"""


def test_processes_sharing_a_log_write_whole_lines(tmp_path):
    """The main process and a worker write to one stdout. With PYTHONUNBUFFERED (set in the container) each
    event went out as two writes, the line and its newline, and about 1 % of the lines held two events glued
    together (helper's attack): a line-by-line JSON reader lost both. Two real processes, one file."""
    log = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        procs = [subprocess.Popen([sys.executable, "-c", _LOGGER, str(i)], stdout=out, env=env) for i in (0, 1)]
        assert [p.wait(120) for p in procs] == [0, 0]
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 40_001
    events = [json.loads(line) for line in lines[:-1]]
    assert sorted((e["worker"], e["item"]) for e in events) == [(w, f"{i:06d}.png") for w in (0, 1)
                                                                for i in range(20_000)]


def test_the_package_check_sees_an_imported_library():
    """Control for the check below: a process that imports matplotlib and scikit-learn shows them mapped."""
    pytest.importorskip("sklearn")
    code = "import sys, matplotlib.pyplot, sklearn.base; print(flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()
        assert {"matplotlib", "sklearn", "scipy"} <= _mapped_packages(proc.pid)
    finally:
        proc.communicate(b"")


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
        for pid in (daemon.proc.pid, started["pid"]):  # Keras imports these when installed; the daemon skips them
            assert not {"matplotlib", "sklearn", "scipy", "pandas"} & _mapped_packages(pid)
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
        time.sleep(0.5)
        code, text = daemon.get("/metrics")
        assert _metric(text, "aemon_reloads_total", '{result="ok"}') == 1, text  # one SIGHUP, not one per process
    finally:
        assert daemon.stop() == 0, daemon.text()
    assert not _alive(started["pid"])
    (main,), (worker,) = daemon.events("daemon.stopped"), daemon.events("worker.stopped")
    assert main["ok"] + main["anomaly"] + worker["ok"] + worker["anomaly"] == len(names)
    assert worker["worker"] == 1 and all(e["worker"] == 1 for e in daemon.events("item.decided") if "worker" in e)
    assert len(records(root)) == len(names)
    assert os.listdir(root / ".aemon" / "claims") == []


def test_hard_links_dropped_under_one_name_stay_separate_drops(tmp_path, digits):
    """Hard links of one file dropped one after another under one name, with two processes: a process whose
    destination already held that inode (placed by the other process, for another drop) took it for its own
    interrupted link-then-unlink, deleted its drop and counted it placed; the record clash then moved the
    other's item away, leaving records that name no item (5 of 100 drops). Each drop now gets its own file
    and its own record."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.2,
                    env={"AEMON_WORKERS": "2", "AEMON_BATCH_WAIT_MS": "0"}).wait_ready()
    _wait_event(daemon, "worker.ready")
    source = write_png(tmp_path / "src" / "x.png", digits[3])
    dropped, deadline = 0, time.monotonic() + 60
    while dropped < 100:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        with contextlib.suppress(FileExistsError):  # the previous link is still in the inbox
            os.link(source, root / "inbox" / "a.png")
            dropped += 1
    found = wait_records(root, dropped, daemon)
    time.sleep(1.0)
    assert daemon.stop() == 0, daemon.text()
    assert len(records(root)) == dropped, daemon.text()
    placed = [p for p in items(root) if p.name != "x.png"]
    assert len(placed) == dropped, sorted(p.name for p in placed)
    for record in found:
        assert (record.parent / record.name[: -len(".json")]).is_file(), f"{record} names no item"


def test_a_live_daemons_claims_folder_without_its_lock_is_never_adopted(tmp_path, digits):
    """The .lock of a running main process removed (a cleaner of old files in /tmp does that): its worker
    took the live claims folder for a batch folder left by an older layout and adopted it, so the main
    process's items were routed under a batch id (ok/1795.../big.npy), its temp file landed in rejected/,
    and the main process died on its vanished folder (exit 1). A folder named for a process that still runs
    is never adopted: every item keeps its path and the daemon goes on."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.2, env={"AEMON_WORKERS": "2"}).wait_ready()
    _wait_event(daemon, "worker.ready")
    (owner,) = [p for p in (root / ".aemon" / "claims").iterdir() if f"-{daemon.proc.pid}-" in p.name]
    (owner / ".lock").unlink()
    names = [f"d-{i:02d}.png" for i in range(30)]
    for i, name in enumerate(names):
        write_png(tmp_path / "stage" / name, digits[i])
        os.rename(tmp_path / "stage" / name, root / "inbox" / name)
        time.sleep(0.1)
    time.sleep(3)  # past several rescans (1 s here), when orphans are adopted
    wait_records(root, len(names), daemon)
    seen = by_item(root)
    assert sorted(seen) == names, sorted(seen)
    for name, (record,) in seen.items():
        assert record["path"] in (f"ok/{name}", f"anomaly/{name}"), record
    assert daemon.events("claim.recovered") == [], daemon.text()
    assert daemon.proc.poll() is None and daemon.stop() == 0, daemon.text()


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


def _cpu_limited_cgroup(name: str, cpus: float) -> tuple[Path, str] | None:
    """A cgroup with a CPU quota of ``cpus`` (v1 ``cpu`` controller or v2 ``cpu.max``), or None."""
    period = 100_000
    v1 = Path("/sys/fs/cgroup/cpu")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            group = v1 / name
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
            return group, "tasks"
        v2 = Path("/sys/fs/cgroup")
        if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            group = v2 / name
            group.mkdir()
            (group / "cpu.max").write_text(f"{int(cpus * period)} {period}")
            return group, "cgroup.procs"
    except OSError:
        return None
    return None


def test_a_cpu_quota_caps_the_default_workers(tmp_path):
    """Under a CPU quota (a container's --cpus, a Kubernetes CPU limit) the default AEMON_WORKERS is the
    quota rounded up, not every core of the host: each process holds a TensorFlow runtime."""
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 cores to tell a quota of 1 from the cores")
    made = _cpu_limited_cgroup(f"aemon-test-{os.getpid()}", 1.0)
    if made is None:
        pytest.skip("cannot make a CPU-limited cgroup here (needs root and a writable cgroup cpu controller)")
    group, procs = made

    def enter() -> None:
        (group / procs).write_text(str(os.getpid()))

    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": None}, preexec=enter)
    try:
        daemon.wait_ready()
        assert daemon.events("daemon.ready")[0]["workers"] == 1, daemon.text()
    finally:
        daemon.stop()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_full_disk_stops_a_two_process_daemon_with_a_message_not_a_bus_error(tmp_path):
    """prometheus_client maps its sparse value files and writes through the map: on a full filesystem the first
    write killed the process with SIGBUS (exit 135, not a line logged). The files are reserved first, so a full
    root is an error that names the cause; once there is room, the daemon starts. It exits 1, not 3 (a start-up
    failure, which the shipped unit never restarts): a full disk passes, and the service stayed down for good
    (helper's attack)."""
    mount = tmp_path / "small"
    if not full_tmpfs(mount, new_root):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        root = mount / "root"
        daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2"})
        code = daemon.proc.wait(timeout=120)
        assert code == 1, f"exit {code}:\n{daemon.text()}"  # not 3: a supervisor starts it again
        assert "No space left on device" in daemon.text(), daemon.text()
        (mount / "filler").unlink()
        again = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2"}).wait_ready()
        assert again.stop() == 0, again.text()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_readyz_is_503_while_the_root_is_full(tmp_path):
    """/readyz said 200 ('the folders are usable') on a root with no byte left, where nothing can be placed or
    recorded; it is 503 while the filesystem is full and 200 again once there is room."""
    mount = tmp_path / "small"
    if not full_tmpfs(mount, new_root):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (mount / "filler").unlink()
        daemon = Daemon(mount / "root", tmp_path / "daemon.log", env={"AEMON_WORKERS": "1"}).wait_ready()
        assert daemon.get("/readyz")[0] == 200
        full_tmpfs_fill(mount)
        assert daemon.get("/readyz")[0] == 503, daemon.text()
        assert daemon.get("/healthz")[0] == 200  # alive: only not ready
        (mount / "filler").unlink()
        assert daemon.get("/readyz")[0] == 200
        assert daemon.stop() == 0, daemon.text()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_every_process_serves_one_model_after_the_bundle_changes(tmp_path, digits):
    """A bundle folder changed without a reload, then a worker restarted (or a swap during a reload): the
    worker loaded the new version while the main process kept the old, and records of one daemon named two
    models (39 and 21 of 60 in a review) while the metrics showed one. The worker now asks the main process
    to reload, and every process ends on the bundle the folder holds."""
    from aemon.bundle import default_bundle_path, read_meta

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path("detect"), bundle)
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2", "AEMON_MODEL": str(bundle)})
    daemon.wait_ready()
    deadline = time.monotonic() + 90
    while not daemon.events("worker.ready"):
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.2)
    old = read_meta(bundle).version
    np.save(tmp_path / "cal.npy", digits[-200:])
    done = subprocess.run([sys.executable, "-m", "aemon", "calibrate", str(bundle), "--data", str(tmp_path / "cal.npy"),
                           "--target-fpr", "0.05"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    new = read_meta(bundle).version
    assert new != old
    (worker,) = [e["pid"] for e in daemon.events("worker.started")]
    os.kill(worker, signal.SIGKILL)  # restarted within 5 s: it loads the changed bundle
    deadline = time.monotonic() + 60
    while not any(e.get("version") == new for e in daemon.events("bundle.loaded") if "worker" not in e):
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.2)
    time.sleep(3)  # the main process's reload is passed on to the worker
    versions = {record["model"]["version"] for record in _records_after(daemon, root, digits)}
    _, text = daemon.get("/metrics")
    assert daemon.stop() == 0, daemon.text()
    assert versions == {new}, (versions, old, new)
    assert f'version="{new}"' in text


def test_a_worker_whose_reload_failed_catches_up_with_the_main_process(tmp_path, digits):
    """The main process reloaded a changed bundle, then the folder was moved away before the worker's reload
    and put back (a redeploy that moves folders): the worker kept the old model for good, nothing said so,
    and records of one daemon named two models (203 and 197 of 400 in an attack) while the metrics showed
    one. A worker that serves another version than the main process now loads again until they agree."""
    from aemon.bundle import default_bundle_path, read_meta

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path("detect"), bundle)
    root = new_root(tmp_path)
    env = {"AEMON_WORKERS": "2", "AEMON_MODEL": str(bundle), "AEMON_RESCAN_SECONDS": "1"}
    daemon = Daemon(root, tmp_path / "daemon.log", env=env).wait_ready()
    _wait_event(daemon, "worker.ready")
    (worker,) = [e["pid"] for e in daemon.events("worker.started")]
    np.save(tmp_path / "cal.npy", digits[-200:])
    done = subprocess.run([sys.executable, "-m", "aemon", "calibrate", str(bundle), "--data", str(tmp_path / "cal.npy"),
                           "--target-fpr", "0.05"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    new = read_meta(bundle).version
    os.kill(worker, signal.SIGSTOP)  # its reload waits until the folder is gone
    try:
        os.kill(daemon.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not any(e.get("version") == new for e in daemon.events("bundle.loaded") if "worker" not in e):
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.1)
        time.sleep(0.5)  # the reload passed on to the (stopped) worker
        os.rename(bundle, tmp_path / "moved")
    finally:
        os.kill(worker, signal.SIGCONT)
    _wait_event(daemon, "bundle.reload_failed")
    os.rename(tmp_path / "moved", bundle)
    deadline = time.monotonic() + 30
    while not any(e.get("version") == new for e in daemon.events("bundle.loaded") if e.get("worker") == 1):
        assert time.monotonic() < deadline, f"the worker never loaded {new}\n{daemon.text()}"
        time.sleep(0.2)
    versions = {record["model"]["version"] for record in _records_after(daemon, root, digits)}
    assert daemon.stop() == 0, daemon.text()
    assert versions == {new}, versions


def test_restart_delays_double_up_to_the_cap_and_reset_after_a_stable_run():
    """The backoff the test below waits for in part (5 and 10 s), to its end: 5, 10, 20 ... 300 s for a worker
    that keeps dying within a minute, 300 s from then on, nothing after a run of a minute or more."""
    from aemon.workers import MAX_BACKOFF, STABLE_SECONDS, restart_delay

    delays, delay = [], 0.0
    for _ in range(9):
        delay = restart_delay(delay, lived=3.0)
        delays.append(delay)
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    assert restart_delay(MAX_BACKOFF, lived=STABLE_SECONDS) == 0.0
    assert restart_delay(0.0, lived=STABLE_SECONDS - 0.1) == 5.0


def test_a_worker_that_cannot_start_is_retried_ever_more_slowly_and_leaves_no_files(tmp_path, digits):
    """The bundle folder removed (a careless redeploy), then the worker killed (the OOM killer): every new
    worker fails to load. It is started again after 5, 10, 20... seconds (the test waits for 5 and 10), not
    every 5 s forever (which burnt most of a core and left 320 KiB of metric files per try, 1.7 MiB a
    minute); a failed worker's value files go with it, and the main process goes on deciding. Each failed
    worker's error line names it: it printed the same "Error: ..." line as the main process would (on a full
    disk both printed one, one failure shown twice with nothing to tell them apart)."""
    from aemon.bundle import default_bundle_path

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path("detect"), bundle)
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2", "AEMON_MODEL": str(bundle)})
    daemon.wait_ready()
    (first,) = _wait_event(daemon, "worker.started")
    _wait_event(daemon, "worker.ready")
    metrics = next((root / ".aemon" / "metrics").iterdir())
    shutil.rmtree(bundle)
    os.kill(first["pid"], signal.SIGKILL)
    exits = _wait_event(daemon, "worker.exited", 2, timeout=60)
    assert [e["restart_in_s"] for e in exits[:2]] == [5.0, 10.0], daemon.text()
    pids = {e["pid"] for e in exits}
    assert not [f.name for f in metrics.glob("*.db") if int(f.stem.rpartition("_")[2]) in pids], \
        "files of dead workers"
    write_png(root / "inbox" / "still.png", digits[0])
    wait_records(root, 1, daemon)
    assert len(daemon.events("worker.started")) in (2, 3)  # the first and one try (a second after 10 s)
    errors = [line for line in daemon.text().splitlines() if line.startswith("Error")]
    assert daemon.stop() == 0, daemon.text()
    assert errors and all(line.startswith("Error (worker 1): ") for line in errors), errors  # none of the main's
    assert str(bundle) in errors[0], errors


def test_a_worker_that_stops_making_progress_is_killed_and_its_entries_adopted(tmp_path, digits):
    """A worker frozen (SIGSTOP) while it holds claimed entries: alive, so never restarted before, and its
    claims locked, so no other process could adopt them; nothing was logged and /healthz said 200 while
    its entries waited for ever. Its loop beats down a pipe to the main process now: silent past the
    liveness limit (here a 4 s systemd watchdog), it is killed and started again, and its entries are
    decided, each once."""
    root = new_root(tmp_path)
    env = {"AEMON_WORKERS": "2", "WATCHDOG_USEC": "4000000", "AEMON_RESCAN_SECONDS": "1"}
    daemon = Daemon(root, tmp_path / "daemon.log", env=env).wait_ready()
    (started,) = _wait_event(daemon, "worker.started")
    _wait_event(daemon, "worker.ready")
    stage = tmp_path / "stage"
    for i in range(600):
        write_png(stage / f"s-{i:03d}.png", digits[i % len(digits)])
    for path in sorted(stage.iterdir()):
        os.rename(path, root / "inbox" / path.name)
    deadline = time.monotonic() + 60
    while not any(e.get("worker") == 1 for e in daemon.events("item.decided")):
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.01)
    (owner,) = (root / ".aemon" / "claims").glob(f"*-{started['pid']}-*")  # the worker's claims
    try:
        for _ in range(200):  # freeze it while it holds entries (between two batches it holds none)
            os.kill(started["pid"], signal.SIGSTOP)
            _wait_stopped(started["pid"])  # a stop lands a moment later: it may have placed and reported by then
            held = sum(len(os.listdir(batch)) for batch in owner.iterdir() if batch.is_dir())
            if held:
                break
            os.kill(started["pid"], signal.SIGCONT)
            time.sleep(0.005)
        (stuck,) = _wait_event(daemon, "worker.stuck", timeout=60)
        assert stuck["pid"] == started["pid"] and stuck["silent_s"] >= 4
        wait_records(root, 600, daemon, timeout=120)
        time.sleep(1.0)
        seen = by_item(root)
        assert len(seen) == 600 and all(len(v) == 1 for v in seen.values())
        assert held > 0
        _wait_event(daemon, "worker.started", 2, timeout=60)  # started again
        # Each decision's score once: the frozen worker's scores of the batch it held were kept (its metric
        # files outlive it), and the batch decided again counted them a second time.
        _, text = daemon.get("/metrics")
        decided = sum(_metric(text, "aemon_items_total", f'{{verdict="{v}"}}') for v in ("ok", "anomaly"))
        assert _metric(text, "aemon_reconstruction_error_count") == decided == 600, text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(started["pid"], signal.SIGCONT)
    assert daemon.stop() == 0, daemon.text()


def test_a_name_written_in_place_after_its_first_copy_was_claimed_waits_for_its_writer(tmp_path, digits):
    """A process that saw an entry renamed in kept it as 'renamed in, complete' after another process had
    claimed it; the same name written again in place was then taken at once, half written, and rejected as
    truncated with the first copy's arrival time (an attack: 3 of 3 bursts, and with one process when the
    user moved or deleted the entry first). An entry that leaves the inbox is now forgotten at once."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3, env={"AEMON_WORKERS": "2"}).wait_ready()
    _wait_event(daemon, "worker.ready")
    (worker,) = [e["pid"] for e in daemon.events("worker.started")]
    data = (tmp_path / "whole.png")
    write_png(data, digits[0])
    whole = data.read_bytes()
    os.kill(worker, signal.SIGSTOP)  # it reads the events of both copies only when the second is half written
    try:
        write_png(tmp_path / "first.png", digits[1]).rename(root / "inbox" / "item.png")
        wait_records(root, 1, daemon)  # the main process claimed and decided it
        fp = half_written(root / "inbox" / "item.png", whole)
    finally:
        os.kill(worker, signal.SIGCONT)
    found = finish_and_stop(daemon, [fp], whole[len(whole) // 2 :], 2)
    first, second = sorted(found["item.png"], key=lambda r: r["decided_at"])
    assert len(found) == 1 and [first["verdict"], second["verdict"]].count("rejected") == 0, found
    assert second["received_at"] > first["decided_at"], (first, second)  # its own arrival, not the first copy's


def test_pending_counts_each_waiting_entry_once(tmp_path, digits):
    """aemon_inbox_pending (summed over the processes) counted every waiting entry once per process: 9,888
    for 3,760 entries in an attack's burst, which a KEDA scaler would have read as three times the load."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3, env={"AEMON_WORKERS": "2"}).wait_ready()
    _wait_event(daemon, "worker.ready")
    held = [open(root / "inbox" / f"open-{i}.png", "wb") for i in range(5)]  # noqa: SIM115 - never complete
    try:
        for fp in held:
            fp.write(b"\x89PNG")
            fp.flush()
        deadline = time.monotonic() + 20
        while (pending := _metric(daemon.get("/metrics")[1], "aemon_inbox_pending")) != 5:
            assert time.monotonic() < deadline, f"pending {pending}, 5 entries waiting"
            time.sleep(0.2)
        time.sleep(2.0)  # every process has seen them by now (and rescanned the inbox)
        assert _metric(daemon.get("/metrics")[1], "aemon_inbox_pending") == 5
    finally:
        for fp in held:
            fp.close()
    assert daemon.stop() == 0, daemon.text()


def test_two_calibrations_of_one_model_are_told_apart_by_the_processes(tmp_path, digits):
    """Two calibrations of one bundle (other target FPRs) are both its revision 2, so both had the same
    version: a worker restarted after the folder was swapped for the other one served another threshold than
    the main process, nothing said so, and an item's verdict depended on which process took it (an attack:
    165 and 435 of 600 records on two thresholds). Processes now compare the whole bundle, not its version."""
    from aemon.bundle import default_bundle_path, read_meta

    base = tmp_path / "base"
    shutil.copytree(default_bundle_path("detect"), base)
    np.save(tmp_path / "cal.npy", digits[-200:])
    for out, fpr in (("loose", "0.05"), ("strict", "0.02")):
        command = ["calibrate", str(base), "--data", str(tmp_path / "cal.npy"), "--target-fpr", fpr, "--out",
                   str(tmp_path / out)]
        done = subprocess.run([sys.executable, "-m", "aemon", *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    loose, strict = read_meta(tmp_path / "loose"), read_meta(tmp_path / "strict")
    assert loose.threshold != strict.threshold
    served = tmp_path / "served"
    shutil.copytree(tmp_path / "loose", served)
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", env={"AEMON_WORKERS": "2", "AEMON_MODEL": str(served)})
    daemon.wait_ready()
    _wait_event(daemon, "worker.ready")
    os.rename(served, tmp_path / "was-served")
    shutil.copytree(tmp_path / "strict", served)
    (worker,) = [e["pid"] for e in daemon.events("worker.started")]
    os.kill(worker, signal.SIGKILL)  # restarted within 5 s: it loads the other calibration
    deadline = time.monotonic() + 60
    while len(daemon.events("worker.ready")) < 2:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.2)
    deadline = time.monotonic() + 30  # the main process is asked to reload, and passes it on to the worker
    while not [e for e in daemon.events("bundle.loaded") if "worker" not in e and e["name"] == "strict"]:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, f"main kept loose:\n{daemon.text()}"
        time.sleep(0.2)
    time.sleep(2)
    thresholds = {record["threshold"] for record in _records_after(daemon, root, digits)}
    assert daemon.stop() == 0, daemon.text()
    assert thresholds == {strict.threshold}, (thresholds, loose.threshold, strict.threshold)


def test_two_daemons_with_workers_on_one_root_serving_different_bundles_do_not_reload_each_other(tmp_path, digits):
    """Replicas sharing a root during a rolling update serve two bundles. The model each main process serves was
    one file per root: each daemon's worker compared itself with the other daemon's bundle and asked its own
    main process to reload, every 5 s, for ever (helper's attack: 7 reloads each in 75 s, still climbing)."""
    from aemon.bundle import default_bundle_path

    other = tmp_path / "other"
    shutil.copytree(default_bundle_path("detect"), other)
    np.save(tmp_path / "cal.npy", digits[-200:])
    done = subprocess.run([sys.executable, "-m", "aemon", "calibrate", str(other), "--data", str(tmp_path / "cal.npy"),
                           "--target-fpr", "0.05"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    root = new_root(tmp_path)
    daemons = [Daemon(root, tmp_path / f"daemon-{i}.log", env={"AEMON_WORKERS": "2", **env}).wait_ready()
               for i, env in enumerate(({}, {"AEMON_MODEL": str(other)}))]
    for daemon in daemons:
        _wait_event(daemon, "worker.ready")
    time.sleep(12)  # more than two nudge intervals
    for i in range(20):
        write_png(root / "inbox" / f"x-{i:02d}.png", digits[i])
    wait_records(root, 20)
    churn = {name: [len(d.events(name)) for d in daemons] for name in ("bundle.diverged", "bundle.behind")}
    reloads = [_metric(d.get("/metrics")[1], "aemon_reloads_total", '{result="ok"}') for d in daemons]
    assert [d.stop() for d in daemons] == [0, 0], daemons[0].text() + daemons[1].text()
    assert churn == {"bundle.diverged": [0, 0], "bundle.behind": [0, 0]} and reloads == [0, 0], (churn, reloads)


def test_a_reload_takes_the_model_path_from_the_changed_config_file(tmp_path, digits):
    """The config file's `model` pointed at another bundle, then SIGHUP: the daemon loaded the old path again
    and counted the reload as ok, so every record still named the old model. Now the main process and its
    worker load the new path; a changed setting that needs a restart is named."""
    from aemon.bundle import default_bundle_path, read_meta

    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(default_bundle_path("detect"), old)
    shutil.copytree(default_bundle_path("detect"), new)
    np.save(tmp_path / "cal.npy", digits[-200:])
    done = subprocess.run([sys.executable, "-m", "aemon", "calibrate", str(new), "--data", str(tmp_path / "cal.npy"),
                           "--target-fpr", "0.05"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    versions = read_meta(old).version, read_meta(new).version
    assert versions[0] != versions[1]
    config = tmp_path / "aemon.toml"
    config.write_text(f'model = "{old}"\nbatch_size = 64\n')
    root = new_root(tmp_path)
    env = {"AEMON_WORKERS": "2", "AEMON_CONFIG": str(config)}
    daemon = Daemon(root, tmp_path / "daemon.log", env=env).wait_ready()
    _wait_event(daemon, "worker.ready")
    config.write_text(f'model = "{new}"\nbatch_size = 8\n')
    os.kill(daemon.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 60
    while {e.get("worker") for e in daemon.events("bundle.loaded") if e.get("version") == versions[1]} != {None, 1}:
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.2)
    named = {record["model"]["version"] for record in _records_after(daemon, root, digits)}
    _, text = daemon.get("/metrics")
    assert daemon.stop() == 0, daemon.text()
    assert named == {versions[1]}, (named, versions)
    assert f'version="{versions[1]}"' in text and f'version="{versions[0]}"' not in text
    (warned,) = daemon.events("reload.needs_restart")
    assert warned["settings"] == ["batch_size"]
