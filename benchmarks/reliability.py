"""Reliability under attack: real `aemon run` processes, real files, real SIGKILLs.

Three scenarios, each ending with a count of lost, duplicated and stray results (all must be 0):

* ``kill-loop``: PNGs, folders (with a hidden file inside) and ``.npy`` arrays dropped in place and
  renamed in, while the daemon is SIGKILLed at random moments; a last daemon drains the rest.
* ``three-daemons``: three daemons on one root, one SIGKILLed mid-run.
* ``burst``: 20,000 PNGs renamed into the inbox at once, one daemon.

A unit is one image file, one file inside a folder, or one array row. *Lost*: a unit with no
record. *Duplicated*: a unit with two records (or an array row in two parts). *Stray*: a result
file without a record, a record without its file or its map, a temp file, anything left in
``inbox/`` or ``.aemon/claims``.

Usage: python benchmarks/reliability.py [--kills 10] [--burst 20000] [--only NAME] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_process import VERDICT_DIRS, Daemon, items, png_bytes, records, wait_drained

#: AEMON_WORKERS of every daemon started here.
WORKERS = "2"


def _daemon(root: Path, log: Path) -> Daemon:
    return Daemon(root, log, settle=0.3, env={"AEMON_WORKERS": WORKERS})


def _digits() -> np.ndarray:
    from aemon.sources import sample_mnist

    x, _ = sample_mnist()
    return x.reshape(-1, 28, 28).astype(np.uint8)


class Dropper:
    """Writes a mix of entries into ``root/inbox`` and remembers the units it dropped."""

    def __init__(self, root: Path, digits: np.ndarray, seed: int = 0) -> None:
        self.root, self.inbox, self.digits = root, root / "inbox", digits
        self.stage = root / "stage"  # same filesystem: a rename into inbox/ is atomic
        self.stage.mkdir(exist_ok=True)
        self.rng = random.Random(seed)
        self.units: set[str] = set()
        self.n = 0

    def _png(self) -> bytes:
        return png_bytes(self.digits[self.rng.randrange(len(self.digits))])

    def drop(self) -> None:
        """One entry: a PNG (in place or renamed in), a folder, or an array."""
        self.n += 1
        kind = self.rng.choice(["png-in-place", "png-rename", "folder", "array"])
        name = f"e{self.n:05d}"
        if kind == "png-in-place":
            (self.inbox / f"{name}.png").write_bytes(self._png())
            self.units.add(f"{name}.png")
        elif kind == "png-rename":
            (self.stage / f"{name}.png").write_bytes(self._png())
            os.rename(self.stage / f"{name}.png", self.inbox / f"{name}.png")
            self.units.add(f"{name}.png")
        elif kind == "folder":
            folder = self.stage / name
            folder.mkdir()
            for i in range(3):
                (folder / f"{i}.png").write_bytes(self._png())
                self.units.add(f"{name}/{i}.png")
            (folder / ".note").write_bytes(b"hidden, kept, rejected")
            self.units.add(f"{name}/.note")
            os.rename(folder, self.inbox / name)
        else:
            rows = self.digits[self.rng.sample(range(len(self.digits)), 5)]
            np.save(self.stage / f"{name}.npy", rows)
            os.rename(self.stage / f"{name}.npy", self.inbox / f"{name}.npy")
            self.units.update(f"{name}.npy[{i}]" for i in range(5))


def account(root: Path, expected: set[str]) -> dict[str, int]:
    """Lost, duplicated and stray counts for ``expected`` units under ``root``."""
    seen: dict[str, int] = {}
    stray = 0
    for rec in records(root):
        data = json.loads(rec.read_text())
        if not os.path.lexists(root / data["path"]):
            stray += 1
        maps = [data["map"]] if "map" in data else [r["map"] for r in data.get("rows", []) if "map" in r]
        stray += sum(1 for m in maps if not (rec.parent / m).is_file())  # a map named but missing
        if "rows" in data:
            for row in data["rows"]:
                key = f"{data['item']}[{row['index']}]"
                seen[key] = seen.get(key, 0) + 1
        else:
            seen[data["item"]] = seen.get(data["item"], 0) + 1
    recorded = {os.fspath(r)[: -len(".json")] for r in records(root)}
    stray += sum(1 for p in items(root) if os.fspath(p) not in recorded)
    stray += len(os.listdir(root / "inbox")) + len(os.listdir(root / ".aemon" / "claims"))
    stray += sum(1 for d in VERDICT_DIRS for _, _, fs in os.walk(root / d) for f in fs if f.startswith(".t-"))
    lost = len(expected - seen.keys())
    duplicated = sum(1 for k, v in seen.items() if v > 1)
    unexpected = len(seen.keys() - expected)
    return {"units": len(expected), "lost": lost, "duplicated": duplicated, "stray": stray + unexpected}


def kill_loop(base: Path, digits: np.ndarray, kills: int) -> dict[str, int]:
    root = base / "kill-loop"
    (root / "inbox").mkdir(parents=True)
    dropper = Dropper(root, digits, seed=1)
    rng = random.Random(2)
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            dropper.drop()
            time.sleep(rng.uniform(0, 0.02))

    log = base / "kill-loop.log"
    thread = threading.Thread(target=drop)
    for k in range(kills):
        daemon = _daemon(root, log).wait_ready()
        if k == 0:
            thread.start()
        time.sleep(rng.uniform(0.2, 2.5))
        daemon.kill()
    stop.set()
    thread.join()
    daemon = _daemon(root, log).wait_ready()
    wait_drained(root, daemon)
    assert daemon.stop() == 0, daemon.text()
    shutil.rmtree(root / "stage")
    return account(root, dropper.units)


def three_daemons(base: Path, digits: np.ndarray) -> dict[str, int]:
    root = base / "three"
    (root / "inbox").mkdir(parents=True)
    daemons = [_daemon(root, base / f"three-{i}.log") for i in range(3)]
    for d in daemons:
        d.wait_ready()
    dropper = Dropper(root, digits, seed=3)
    for i in range(600):
        dropper.drop()
        if i == 300:
            daemons[1].kill()
    wait_drained(root, daemons[0])
    for d in (daemons[0], daemons[2]):
        assert d.stop() == 0, d.text()
    shutil.rmtree(root / "stage")
    return account(root, dropper.units)


def burst(base: Path, digits: np.ndarray, n: int) -> dict[str, int]:
    root = base / "burst"
    (root / "inbox").mkdir(parents=True)
    stage = root / "stage"
    stage.mkdir()
    blobs = [png_bytes(digits[i % len(digits)]) for i in range(min(n, len(digits)))]
    names = [f"b{i:06d}.png" for i in range(n)]
    for i, name in enumerate(names):
        (stage / name).write_bytes(blobs[i % len(blobs)])
    daemon = _daemon(root, base / "burst.log").wait_ready()
    started = time.monotonic()
    for name in names:
        os.rename(stage / name, root / "inbox" / name)
    wait_drained(root, daemon, timeout=1800)
    took = time.monotonic() - started - 2.0  # wait_drained waits 2 s of quiet
    assert daemon.stop() == 0, daemon.text()
    shutil.rmtree(stage)
    out = account(root, set(names))
    out["seconds"] = round(took, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs in the kill loop (10)")
    parser.add_argument("--burst", type=int, default=20_000, help="files in the burst (20,000)")
    parser.add_argument("--only", choices=["kill-loop", "three-daemons", "burst"])
    parser.add_argument("--workers", default="2", help="AEMON_WORKERS of every daemon (2: a worker each)")
    args = parser.parse_args()
    global WORKERS
    WORKERS = args.workers
    digits = _digits()
    results = {}
    with tempfile.TemporaryDirectory(prefix="aemon-reliability-") as tmp:
        base = Path(tmp)
        if args.only in (None, "kill-loop"):
            results["kill-loop"] = kill_loop(base, digits, args.kills)
        if args.only in (None, "three-daemons"):
            results["three-daemons"] = three_daemons(base, digits)
        if args.only in (None, "burst"):
            results["burst"] = burst(base, digits, args.burst)
    print(f"AEMON_WORKERS={WORKERS} for every daemon")
    print(f"{'scenario':<15}{'units':>8}{'lost':>7}{'dup':>6}{'stray':>7}")
    bad = 0
    for name, r in results.items():
        extra = f"  ({r['seconds']} s, {r['units'] / r['seconds']:.0f} items/s)" if "seconds" in r else ""
        print(f"{name:<15}{r['units']:>8}{r['lost']:>7}{r['duplicated']:>6}{r['stray']:>7}{extra}")
        bad += r["lost"] + r["duplicated"] + r["stray"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
