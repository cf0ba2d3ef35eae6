"""`aemon run` as a real process, fed by real writers (cp, mv, rsync, slow partial writes),
killed with SIGKILL, shared by two daemons, fed bad input, and scraped for metrics. No mocks.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from daemon_process import (
    VERDICT_DIRS,
    Daemon,
    by_item,
    finish_and_stop,
    half_written,
    items,
    load,
    new_root,
    png_bytes,
    records,
    wait_drained,
    wait_records,
    write_png,
)

#: Settle time of the shared daemon; the slow writer pauses longer than half of it.
SETTLE = 0.5
METRICS = {  # contract name -> labels its samples must carry
    "aemon_items_total": {"verdict"},
    "aemon_batches_total": set(),
    "aemon_errors_total": {"reason"},
    "aemon_reconstruction_error": set(),
    "aemon_anomaly_threshold": set(),
    "aemon_item_latency_seconds": set(),
    "aemon_scoring_duration_seconds": set(),
    "aemon_inbox_pending": set(),
    "aemon_last_decision_timestamp_seconds": set(),
    "aemon_model_info": {"name", "version", "arch"},
    "aemon_reloads_total": {"result"},
}


# -- helpers -------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One daemon shared by the writer, bad-input and metrics tests (startup costs seconds)."""
    base = tmp_path_factory.mktemp("live")
    root = new_root(base)
    daemon = Daemon(root, base / "daemon.log", settle=SETTLE).wait_ready()
    yield daemon
    assert daemon.stop() == 0, daemon.text()


# -- 1. real writers -----------------------------------------------------
def _slow_write(path: Path, data: bytes, pause: float) -> None:
    with path.open("wb") as fp:
        fp.write(data[: len(data) // 2])
        fp.flush()
        time.sleep(pause)
        fp.write(data[len(data) // 2:])


def test_real_writers_each_item_once_and_whole(live, tmp_path, digits):
    """cp in place, mv from a sibling folder, cp -r of a folder, a half-then-half write that pauses past the
    settle time."""
    root = live.root
    before = len(records(root))
    src = tmp_path / "src"
    write_png(src / "by cp.png", digits[1])
    staging = root / "staging"  # a sibling of inbox/: same filesystem, so mv is a rename
    write_png(staging / "by-mv.png", digits[3])
    batch = tmp_path / "batch"
    write_png(batch / "a.png", digits[4])
    write_png(batch / "b.png", digits[5])
    (batch / ".b.png.swp").write_bytes(b"editor swap file")
    (batch / "c.png.part").write_bytes(png_bytes(digits[6])[:40])

    subprocess.run(["cp", str(src / "by cp.png"), str(root / "inbox")], check=True)
    subprocess.run(["mv", str(staging / "by-mv.png"), str(root / "inbox")], check=True)
    subprocess.run(["cp", "-r", str(batch), str(root / "inbox" / "batch")], check=True)
    # Pauses for three settle times with the file open: the missing close keeps it out of reach.
    writer = threading.Thread(target=_slow_write,
                              args=(root / "inbox" / "slow.png", png_bytes(digits[7]), SETTLE * 3))
    writer.start()
    writer.join()

    expected = {"by cp.png", "by-mv.png", "batch/a.png", "batch/b.png", "slow.png"}
    kept = {"batch/.b.png.swp", "batch/c.png.part"}  # inside a folder: never scored, never lost
    wait_records(root, before + len(expected) + len(kept), live)
    time.sleep(1.0)  # anything extra (a second take of a half-written file) would show up now
    seen = by_item(root)
    for name in expected:
        assert len(seen[name]) == 1, seen[name]
        rec = seen[name][0]
        assert rec["verdict"] in ("ok", "anomaly"), rec
        assert (root / rec["path"]).is_file()
    assert (root / seen["slow.png"][0]["path"]).read_bytes() == png_bytes(digits[7])
    assert seen["batch/a.png"][0]["batch"] == "batch"
    for name in kept:
        (rec,) = seen[name]
        assert rec["verdict"] == "rejected" and rec["reason"] == "ignored_name", rec
    assert (root / "rejected" / "batch" / "c.png.part").read_bytes() == png_bytes(digits[6])[:40]
    assert len(records(root)) == before + len(expected) + len(kept)


def test_rsync_publishes_whole_files(live, tmp_path, digits):
    """rsync writes a hidden temp file and renames it: one record, the whole file, no temp name taken."""
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed (Debian package rsync: apt-get install rsync)")
    root = live.root
    before = len(records(root))
    src = write_png(tmp_path / "by-rsync.png", digits[2])
    subprocess.run([rsync, str(src), str(root / "inbox") + "/"], check=True)
    wait_records(root, before + 1, live)
    time.sleep(1.0)
    (rec,) = by_item(root)["by-rsync.png"]
    assert (root / rec["path"]).read_bytes() == src.read_bytes()
    assert len(records(root)) == before + 1
    assert not (root / "inbox" / "by-rsync.png").exists()


def test_a_folder_with_old_times_filled_in_place_waits_for_the_settle_time(live, tmp_path, digits):
    """Found by attacking a daemon: ``rsync -a`` (and ``cp -p``, ``tar``) set files and folders to the source's
    times, and the settle time was measured from the newest modification time as well as from what the daemon
    saw: a folder being filled looked quiet for hours and was taken between two files (``empty`` records for
    its subfolders, the files that came later left in rejected/ without records). Now only time the daemon
    has seen the entry unchanged counts. Deterministic case: a folder made in place, its time set an hour
    back, filled a fifth of the settle time later."""
    root = live.root
    before = len(records(root))
    folder = root / "inbox" / "old-times"
    (folder / "sub").mkdir(parents=True)
    hour_ago = time.time() - 3600
    for path in (folder / "sub", folder):
        os.utime(path, (hour_ago, hour_ago))
    time.sleep(SETTLE / 5)
    for i in range(3):
        write_png(tmp_path / f"o{i}.png", digits[i])
        shutil.copy2(tmp_path / f"o{i}.png", folder / "sub" / f"o{i}.png")  # keeps the source's time
    wait_records(root, before + 3, live)
    time.sleep(1.0)
    found = {item: rs for item, rs in by_item(root).items() if item.startswith("old-times/")}
    assert sorted(found) == [f"old-times/sub/o{i}.png" for i in range(3)], found
    assert all(rs[0]["verdict"] in ("ok", "anomaly") for rs in found.values()), found


# -- 4. bad input --------------------------------------------------------
def _huge_header_png(pixels: np.ndarray) -> bytes:
    """A small valid PNG whose IHDR claims 50000x50000 (CRC fixed): nothing big is allocated."""
    data = bytearray(png_bytes(pixels))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 50000, 50000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_input_is_rejected_with_reasons(live, tmp_path, digits):
    root, inbox = live.root, live.root / "inbox"
    before = len(records(root))
    good = png_bytes(digits[8])
    stage = tmp_path / "bad"
    stage.mkdir()
    (stage / "truncated.png").write_bytes(good[: len(good) // 2])
    (stage / "zero.png").write_bytes(b"")
    (stage / "garbage bytes ü.png").write_bytes(os.urandom(300))
    np.save(stage / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(stage / "objects.npz", x=np.array([[1, 2], "x"], dtype=object))
    np.save(stage / "no rows.npy", np.zeros((0, 28, 28), np.uint8))
    np.save(stage / "shape.npy", np.zeros((3, 5, 7), np.uint8))
    (stage / "huge.png").write_bytes(_huge_header_png(digits[9]))
    expected = {"truncated.png": "unreadable", "zero.png": "empty", "garbage bytes ü.png": "unreadable",
                "pickled.npy": "unsafe", "objects.npz": "unsafe", "no rows.npy": "empty",
                "shape.npy": "bad_shape", "huge.png": "too_large", "passwd link.png": "unsafe"}
    for entry in stage.iterdir():  # rename in: each appears whole
        os.rename(entry, inbox / entry.name)
    os.symlink("/etc/passwd", inbox / "passwd link.png")

    wait_records(root, before + len(expected), live)
    assert live.get("/healthz")[0] == 200
    assert live.get("/readyz")[0] == 200
    seen = by_item(root)
    for name, reason in expected.items():
        assert len(seen.get(name, [])) == 1, (name, seen.get(name))
        rec = seen[name][0]
        assert rec["verdict"] == "rejected" and rec["reason"] == reason, rec
        assert isinstance(rec["error"], str) and rec["error"], rec
        assert rec["path"] == f"rejected/{name}"
    assert (root / "rejected" / "passwd link.png").is_symlink()
    assert (root / "rejected" / "zero.png").read_bytes() == b""
    assert Path("/etc/passwd").exists()

    (inbox / "good after ünïcode.png").write_bytes(good)
    wait_records(root, before + len(expected) + 1, live)
    rec = by_item(root)["good after ünïcode.png"]
    assert len(rec) == 1 and rec[0]["verdict"] in ("ok", "anomaly")
    assert live.get("/healthz")[0] == 200


# -- 5. metrics ----------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def test_metrics_match_records_on_disk(live, digits):
    root = live.root
    before = len(records(root))
    for i in range(3):
        write_png(root / "inbox" / f"metric-{i}.png", digits[20 + i])
    (root / "inbox" / "metric-bad.png").write_bytes(b"nope")
    wait_records(root, before + 4, live)
    deadline = time.monotonic() + 10
    while True:  # the counter is bumped right after the record is written
        code, text = live.get("/metrics")
        assert code == 200
        samples = _samples(text)
        counted = {lab["verdict"]: v for n, lab, v in samples if n == "aemon_items_total"}
        on_disk = {v: len([p for p in records(root) if load(p)["verdict"] == v]) for v in VERDICT_DIRS}
        if {v: counted.get(v, 0.0) for v in VERDICT_DIRS} == on_disk or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {v: counted.get(v, 0.0) for v in VERDICT_DIRS} == on_disk
    for name, labels in METRICS.items():
        family = [(n, lab) for n, lab, _ in samples if n == name or n.startswith(name + "_")]
        assert family, f"{name} missing from /metrics"
        assert all(labels <= lab.keys() for _, lab in family), (name, family)
    info = next(lab for n, lab, _ in samples if n == "aemon_model_info")
    assert info["name"] == "mnist-detect" and info["version"]
    errors = {lab["reason"]: v for n, lab, v in samples if n == "aemon_errors_total" and v}
    rejected = [load(p)["reason"] for p in records(root) if load(p)["verdict"] == "rejected"]
    assert errors == {r: float(rejected.count(r)) for r in set(rejected)}
    hist = {n: v for n, lab, v in samples if n.startswith("aemon_reconstruction_error_") and not lab}
    assert hist["aemon_reconstruction_error_count"] == on_disk["ok"] + on_disk["anomaly"]
    # _sum too: prometheus_client leaves it out of a histogram with a negative bucket (one process only)
    scores = [load(p)["score"] for p in records(root) if load(p)["verdict"] != "rejected"]
    assert hist.get("aemon_reconstruction_error_sum") == pytest.approx(sum(scores), rel=1e-6), hist


# -- 3. two daemons, one root --------------------------------------------
def test_two_daemons_share_one_root(tmp_path, digits):
    root = new_root(tmp_path)
    a = Daemon(root, tmp_path / "a.log")
    b = Daemon(root, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        assert a.port != b.port
        names = [f"two-{i:03d}.png" for i in range(100)]
        for i, name in enumerate(names):
            write_png(root / "inbox" / name, digits[i])
        wait_records(root, len(names), a)
        time.sleep(1.0)
        seen = by_item(root)
        assert sorted(seen) == names
        assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
        assert len(items(root)) == len(names)
        assert all(r["verdict"] in ("ok", "anomaly") for v in seen.values() for r in v)
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), a.text() + b.text()
    decided = [line for log in ("a.log", "b.log") for line in (tmp_path / log).read_text().splitlines()
               if '"item.decided"' in line]
    assert len(decided) == 100
    assert not os.listdir(root / "inbox")
    assert not os.listdir(root / ".aemon" / "claims")


# -- 2. crash safety -----------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path, digits):
    rng = random.Random(1234)
    root = new_root(tmp_path)
    src = tmp_path / "src"
    names = [f"crash-{i:03d}.png" for i in range(200)]
    for i, name in enumerate(names):
        write_png(src / name, digits[i])
    log = tmp_path / "daemon.log"
    stop = threading.Event()

    def drop() -> None:
        for name in names:
            if stop.is_set():
                return
            shutil.copyfile(src / name, root / "inbox" / name)  # written in place
            time.sleep(rng.uniform(0, 0.06))

    dropper = threading.Thread(target=drop)
    try:
        for round_ in range(3):
            daemon = Daemon(root, log).wait_ready()
            if round_ == 0:
                dropper.start()
            time.sleep(rng.uniform(0.3, 3.0))
            daemon.kill()
        dropper.join()
        daemon = Daemon(root, log).wait_ready()
        wait_records(root, len(names), daemon, timeout=120)
        wait_drained(root, daemon, timeout=30, quiet=1.0)
        assert daemon.stop() == 0, daemon.text()
    finally:
        stop.set()
        if dropper.is_alive():
            dropper.join()
    assert log.read_text().count('"daemon.ready"') == 4
    seen = by_item(root)
    assert sorted(seen) == names
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    routed = items(root)
    assert sorted(p.name for p in routed) == names, "every item has exactly one destination file"
    for rec in records(root):  # no orphan records: each names an existing destination beside it
        data = load(rec)
        assert rec.name == Path(data["path"]).name + ".json"
        assert (root / data["path"]).is_file()
        assert data["verdict"] in ("ok", "anomaly"), data
    for item in routed:
        assert item.with_name(item.name + ".json").is_file()
    assert not os.listdir(root / "inbox")
    assert not os.listdir(root / ".aemon" / "claims")
    leftovers = [p for d in VERDICT_DIRS for p in (root / d).rglob(".*")]
    assert not leftovers, "temp files are written in the batch folder, never beside results"


def test_a_journalled_batch_is_finished_exactly_on_restart(tmp_path, digits):
    """A batch killed mid-commit: one item placed without its record, one caught between link and
    unlink, one not yet moved, an array whose parts are written but not placed. The restart
    finishes that decision and scores nothing again."""
    from aemon.journal import Journal, Step
    from aemon.router import rows_bytes

    root = new_root(tmp_path)
    batch = root / ".aemon" / "claims" / "dead-daemon" / "0001700000000000-0123456789ab"
    for name in ("placed.png", "linked.png", "waiting.png"):
        write_png(batch / name, digits[30])
    np.save(batch / "rows.npy", digits[:3])
    (batch / ".out-part.npy").write_bytes(rows_bytes(digits[:2], "rows.npy"))
    (root / "ok").mkdir()
    (root / "anomaly").mkdir()
    steps = [Step(n, f"ok/{n}", {"item": n, "verdict": "ok", "path": f"ok/{n}"})
             for n in ("placed.png", "linked.png", "waiting.png")]
    steps.append(Step(".out-part.npy", "ok/rows.npy",
                      {"item": "rows.npy", "verdict": "ok", "path": "ok/rows.npy", "rows": [{"index": 0}]}))
    journal = Journal(entries=["placed.png", "linked.png", "waiting.png", "rows.npy"], steps=steps,
                      remove=["rows.npy"])
    journal.write(batch)
    os.rename(batch / "placed.png", root / "ok" / "placed.png")  # the kill came before its record
    os.link(batch / "linked.png", root / "ok" / "linked.png")  # ... or between link and unlink
    (batch.parent / ".lock").write_text("")  # its owner's lock file, no longer held

    daemon = Daemon(root, tmp_path / "daemon.log", settle=0).wait_ready()
    try:
        wait_records(root, 4, daemon)
    finally:
        assert daemon.stop() == 0, daemon.text()
    assert sorted(os.listdir(root / "ok")) == sorted(
        ["placed.png", "placed.png.json", "linked.png", "linked.png.json", "waiting.png", "waiting.png.json",
         "rows.npy", "rows.npy.json"])
    assert np.array_equal(np.load(root / "ok" / "rows.npy"), digits[:2])
    assert load(root / "ok" / "rows.npy.json")["rows"] == [{"index": 0}]  # the journalled record, not a new one
    assert os.listdir(root / "anomaly") == []
    assert os.listdir(root / ".aemon" / "claims") == []
    assert '"claim.finished"' in daemon.text()


def test_a_name_written_in_place_after_the_user_took_it_back_waits_for_its_writer(tmp_path, digits):
    """Renamed in, then moved out or deleted by the user before the daemon took it (the daemon stopped here,
    busy with a burst in the attack), then written again in place: it was taken at once as the copy renamed
    in, half written, and rejected as truncated. Now the second file waits for its writer."""
    import signal

    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3, env={"AEMON_WORKERS": "1"}).wait_ready()
    whole = write_png(tmp_path / "whole.png", digits[0]).read_bytes()
    held = []
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        for name, take_back in (("moved.png", "move"), ("deleted.png", "delete")):
            path = write_png(tmp_path / f"first-{name}", digits[1]).rename(root / "inbox" / name)
            if take_back == "move":
                path.rename(tmp_path / f"taken-back-{name}")
            else:
                path.unlink()
            fp = half_written(path, whole)
            held.append(fp)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    found = finish_and_stop(daemon, held, whole[len(whole) // 2 :], 2)
    assert sorted(found) == ["deleted.png", "moved.png"], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found


def test_files_still_written_under_another_name_or_in_a_folder_renamed_in_wait_for_their_writer(tmp_path, digits):
    """Found by attacking a daemon: a half-written file hard-linked into the inbox while its writer wrote on
    under its other name (the /proc check compared path names only), and a folder renamed in while a file in
    it was still open for writing (a renamed-in entry counted as complete; the daemon's own return of files
    added to a claimed folder is such a folder), were taken at once and rejected as truncated."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    whole = write_png(tmp_path / "whole.png", digits[2]).read_bytes()
    (tmp_path / "writer").mkdir()
    linked = half_written(tmp_path / "writer" / "linked.png", whole)
    os.link(tmp_path / "writer" / "linked.png", root / "inbox" / "linked.png")
    folder = tmp_path / "batch"
    write_png(folder / "done.png", digits[3])
    inside = half_written(folder / "open.png", whole)
    folder.rename(root / "inbox" / "batch")
    found = finish_and_stop(daemon, [linked, inside], whole[len(whole) // 2 :], 3)
    assert sorted(found) == ["batch/done.png", "batch/open.png", "linked.png"], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found


def test_a_file_written_on_after_its_subfolder_was_renamed_waits_for_its_writer(tmp_path, digits):
    """A helper's attack: a file being written in a subfolder that is renamed (``x/.up`` to ``x/sub``, an upload
    made visible inside a folder) kept its old path among the files the inbox saw open, so the /proc check
    looked for a writer of ``x/.up/f.png``, found none (the writer holds ``x/sub/f.png``) and the folder was
    taken: the file was rejected as truncated while its writer wrote on. The same for a folder renamed in
    whose subfolder is renamed while a file in it is written."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    whole = write_png(tmp_path / "whole.png", digits[2]).read_bytes()
    inbox = root / "inbox"
    write_png(inbox / "x" / "keep.png", digits[3])
    (inbox / "x" / ".up").mkdir()
    in_place = half_written(inbox / "x" / ".up" / "f.png", whole)
    write_png(tmp_path / "c" / "a.png", digits[4])
    (tmp_path / "c" / ".s").mkdir()
    renamed_in = half_written(tmp_path / "c" / ".s" / "g.png", whole)
    time.sleep(0.2)
    (inbox / "x" / ".up").rename(inbox / "x" / "sub")
    (tmp_path / "c").rename(inbox / "c")
    time.sleep(0.5)
    (inbox / "c" / ".s").rename(inbox / "c" / "s")
    found = finish_and_stop(daemon, [in_place, renamed_in], whole[len(whole) // 2 :], 4)
    assert sorted(found) == ["c/a.png", "c/s/g.png", "x/keep.png", "x/sub/f.png"], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found


def test_a_folder_made_in_the_inbox_and_filled_later_is_scored_not_rejected_as_empty(tmp_path, digits):
    """Found by attacking a daemon: ``rsync --temp-dir`` (and ``mkdir`` then ``cp``) makes the folder first and
    fills it later. The empty folder was taken once settled and rejected as empty, and the files written
    into it afterwards landed in rejected/ with no record."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    source = tmp_path / "source"
    for i in range(3):
        write_png(source / f"{i}.png", digits[i])
    (root / "inbox" / "job").mkdir()
    time.sleep(2)  # several settle times
    subprocess.run(["rsync", "-r", f"--temp-dir={tmp_path}", f"{source}/", f"{root / 'inbox' / 'rt'}/"], check=True)
    for i in range(3):
        shutil.copy(source / f"{i}.png", root / "inbox" / "job")
    wait_records(root, 6, daemon)
    time.sleep(0.5)
    found = by_item(root)
    assert daemon.stop() == 0, daemon.text()
    assert sorted(found) == [f"{folder}/{i}.png" for folder in ("job", "rt") for i in range(3)], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found
    assert not (root / "rejected" / "job").exists()


def test_every_link_of_a_half_written_file_waits_for_its_writer(tmp_path, digits):
    """Found by attacking a daemon: a file still being written, hard-linked into the inbox under two names. The
    /proc check kept one inbox path per inode, so only one link was seen held; the other was taken at once
    and rejected as truncated (and grew to the whole image inside rejected/)."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    whole = write_png(tmp_path / "whole.png", digits[6]).read_bytes()
    (tmp_path / "writer").mkdir()
    fp = half_written(tmp_path / "writer" / "twice.png", whole)
    for name in ("first.png", "second.png"):
        os.link(tmp_path / "writer" / "twice.png", root / "inbox" / name)
    found = finish_and_stop(daemon, [fp], whole[len(whole) // 2 :], 2)
    assert sorted(found) == ["first.png", "second.png"], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found


def test_hard_links_of_one_file_under_many_names_are_claimed_in_one_go(tmp_path, digits):
    """Thirty hard links of one finished file dropped under thirty names: the claim of each link changed the
    file's status time, which a claim took for another entry under the others' names, so each of them settled
    again, one settle time per link (a helper's attack: 30 links took 18 s instead of 3, with 435
    ``inbox.entry_replaced`` events; 100 links 52 s and 4,284 events). A claim now tells entries apart by
    inode alone."""
    root = new_root(tmp_path)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    source = write_png(tmp_path / "writer" / "one.png", digits[2])
    names = [f"link-{i:02d}.png" for i in range(30)]
    for name in names:
        os.link(source, root / "inbox" / name)
    wait_records(root, len(names), daemon)
    time.sleep(0.5)
    assert daemon.stop() == 0, daemon.text()
    assert sorted(by_item(root)) == names
    assert daemon.events("inbox.entry_replaced") == []


def test_a_writer_pausing_mid_file_is_waited_for_when_the_root_is_reached_through_a_link(tmp_path, digits):
    """``AEMON_ROOT`` through a symbolic link (``/data`` -> ``/mnt/vol``): /proc shows a writer's file by its
    resolved path, which never matched the inbox path as given, so a writer pausing mid-file was not seen
    (found by attacking a daemon)."""
    real = new_root(tmp_path, "real")
    (tmp_path / "link").symlink_to(real)
    daemon = Daemon(tmp_path / "link", tmp_path / "daemon.log", settle=0.3).wait_ready()
    whole = write_png(tmp_path / "whole.png", digits[4]).read_bytes()
    held = []
    for name, base in (("via-link.png", tmp_path / "link"), ("via-real.png", real)):
        fp = half_written(base / "inbox" / name, whole)
        held.append(fp)
    found = finish_and_stop(daemon, held, whole[len(whole) // 2 :], 2)
    assert sorted(found) == ["via-link.png", "via-real.png"], found
    assert all(len(rs) == 1 and rs[0]["verdict"] != "rejected" for rs in found.values()), found


def test_a_file_held_open_before_the_daemon_starts_waits_for_its_writer(tmp_path, digits):
    """A daemon (or a worker) starting while a writer is paused mid-file: no event tells of the file, only the
    start-up scan, and it was taken half written once quiet for the settle time (a worker of a fresh daemon
    found a returned folder so, in an attack). Entries found by a scan are now checked in /proc too."""
    root = new_root(tmp_path)
    whole = write_png(tmp_path / "whole.png", digits[5]).read_bytes()
    fp = half_written(root / "inbox" / "paused.png", whole)
    daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
    found = finish_and_stop(daemon, [fp], whole[len(whole) // 2 :], 1)
    assert list(found) == ["paused.png"], found
    assert found["paused.png"][0]["verdict"] != "rejected", found


def test_a_writer_through_a_bind_mount_of_the_inbox_is_waited_for(tmp_path, digits):
    """A writer that reaches the inbox by another mount (a bind mount; a container's view of the same folder)
    writes a file whose descriptor /proc names by that mount's path: it was not recognised, and a paused
    writer's file was taken half written (found by attacking a daemon). Same file name: matched by inode."""
    root = new_root(tmp_path)
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(root / "inbox"), str(view)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need root (CAP_SYS_ADMIN)")
    try:
        daemon = Daemon(root, tmp_path / "daemon.log", settle=0.3).wait_ready()
        whole = write_png(tmp_path / "whole.png", digits[6]).read_bytes()
        fp = half_written(view / "via-mount.png", whole)
        found = finish_and_stop(daemon, [fp], whole[len(whole) // 2 :], 1)
    finally:
        subprocess.run(["umount", str(view)], check=False)
    assert list(found) == ["via-mount.png"], found
    assert found["via-mount.png"][0]["verdict"] != "rejected", found
