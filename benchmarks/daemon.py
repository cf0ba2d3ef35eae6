"""Daemon figures (run on demand, not in tests): throughput, latency, readiness, memory.

Prints, all measured in this run on this machine:
* files/s for N single PNGs dropped at once (renamed in), as a ratio to a bare single-threaded
  loop (decode + rename + fsync'd JSON record) over the same files, run just before each burst
  (three rounds by default; the median ratio is the figure);
* p50/p99 arrival→record latency at a steady rate of renamed-in files, beside a probe that fsyncs
  100 bytes every 10 ms (its stalls are the filesystem's, not the daemon's);
* a 10,000-row .npy through the daemon as a ratio to a bare compiled model call run just before it
  (four arrays one after another: the first of a fresh daemon, and the median of the other three);
* seconds from process start to /readyz 200 (``--only ready``: three fresh daemons, each beside a bare
  ``import tensorflow``);
* with ``--only real``: N 128x128 grey PNGs scored by a bundle trained with aemon's defaults, against
  a bare loop that decodes the same files, scores them in batches with the same compiled model and
  writes the same fsync'd records (and against decoding + scoring alone);
* RSS after a first and a last block of items.

Usage: python benchmarks/daemon.py [--files 5000] [--rate 100] [--seconds 20] [--rss-items 1000 50000]
       [--daemons N] [--rounds 3] [--only ready|throughput|latency|array|rss|real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digits(n: int) -> np.ndarray:
    from aemon.sources import sample_mnist

    x, _ = sample_mnist()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    return x[np.arange(n) % len(x)]


def _write_pngs(folder: Path, images: np.ndarray, prefix: str = "d") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{prefix}{i:06d}.png"
        Image.fromarray(img, mode="L").save(p)
        paths.append(p)
    return paths


def _bare_loop(paths: list[Path], out: Path) -> float:
    """Decode + rename + fsync'd JSON record, one file at a time."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        dest = out / p.name
        os.rename(p, dest)
        with open(str(dest) + ".json", "w") as fp:
            json.dump({"item": p.name, "verdict": "ok"}, fp)
            fp.flush()
            os.fsync(fp.fileno())
    return time.perf_counter() - start


class _Daemon:
    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.cleared = 0
        self.port = _free_port()
        for name in ("inbox",):
            (root / name).mkdir(parents=True, exist_ok=True)
        full = {**os.environ, "AEMON_ROOT": str(root), "AEMON_METRICS_PORT": str(self.port),
                "AEMON_LOG_LEVEL": "WARNING", "AEMON_LOG_FORMAT": "json", "AEMON_SETTLE_SECONDS": "0.5", **env}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "aemon", "run"], env=full,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ready_after = self._wait_ready()
        self.all_ready_after = self._wait_processes(int(full.get("AEMON_WORKERS") or os.cpu_count() or 1))

    def _wait_ready(self) -> float:
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("daemon not ready within 120 s")

    def _wait_processes(self, n: int) -> float:
        """Seconds from start until ``n`` processes (main + workers) route items (aemon_processes)."""
        deadline = time.perf_counter() + 180
        while time.perf_counter() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("aemon_processes ") and float(line.split()[1]) >= n:
                        return time.perf_counter() - self.started
            time.sleep(0.1)
        raise RuntimeError(f"{n} processes not ready within 180 s")

    def _pids(self) -> list[int]:
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the daemon and its worker processes."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self._pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / ticks

    def rss_mb(self) -> float:
        """RSS of the daemon and its worker processes, MB."""
        total = 0.0
        for pid in self._pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        return total

    def clear_outputs(self) -> None:
        """Empty ok/ and anomaly/ (keeps a long run's disk use flat); counted as records already."""
        for folder in ("ok", "anomaly"):
            base = self.root / folder
            if not base.is_dir():
                continue
            self.cleared += sum(1 for e in os.scandir(base) if e.name.endswith(".json"))
            shutil.rmtree(base)
            base.mkdir()

    def records(self) -> int:
        n = self.cleared
        for folder in ("ok", "anomaly", "rejected"):
            base = self.root / folder
            if base.is_dir():
                n += sum(1 for e in os.scandir(base) if e.name.endswith(".json"))
        return n

    def wait_records(self, n: int, timeout: float = 600) -> float:
        """When the ``n``-th record appeared (within 5 ms). Counting thousands of records takes milliseconds of the
        CPU the daemon is measured on, so the count is taken every 50 ms until the last tenth, then every 5 ms."""
        deadline = time.perf_counter() + timeout
        while (done := self.records()) < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {done} of {n} records after {timeout} s")
            time.sleep(0.05 if n - done > n // 10 else 0.005)
        return time.perf_counter()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def bench_ready(tmp: Path, starts: int = 3) -> None:
    """Seconds to /readyz 200 of ``starts`` fresh daemons, each right after a bare ``import tensorflow`` in
    a new process of the same interpreter (the floor of any process that loads a Keras model)."""
    for i in range(starts):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, stderr=subprocess.DEVNULL)
        bare = time.perf_counter() - t
        d = _Daemon(tmp / f"root_ready{i}")
        print(f"ready: /readyz 200 after {d.ready_after:.2f} s, every worker routing after {d.all_ready_after:.2f} s;"
              f" a bare `import tensorflow` just before: {bare:.2f} s")
        d.stop()


def bench_throughput(tmp: Path, n: int, daemons: int = 1, rounds: int = 3) -> None:
    """``rounds`` rounds, each a bare loop then a burst into the same running daemon(s), on fresh
    files: the fsync-bound floor swings between runs on a shared disk, so each burst is compared
    with the floor measured just before it, and the median ratio is the figure."""
    images = _digits(n)
    root = tmp / f"root_tp{daemons}"
    ds = [_Daemon(root) for _ in range(daemons)]  # replicas on one root share the inbox
    print(f"ready: /readyz 200 after {ds[0].ready_after:.2f} s from process start, every worker routing after "
          f"{ds[0].all_ready_after:.2f} s")
    ratios = []
    for r in range(rounds):
        # Both runs start on a quiet disk (inputs written, then synced) and write into folders that keep
        # the earlier rounds' results, as a running daemon's do. Nothing is deleted between rounds: on
        # ext4, creating files right after thousands were deleted costs several times more system time
        # (the allocator skips recently freed inodes), and that hit whichever side wrote near them.
        bare_src = _write_pngs(tmp / f"bare_src{r}", images)
        staged = _write_pngs(tmp / f"stage{r}", images)
        os.sync()
        cpu_bare = time.process_time()
        t_bare = _bare_loop(bare_src, tmp / "bare_out")
        cpu_bare = time.process_time() - cpu_bare
        os.sync()
        cpu = sum(d.cpu_seconds() for d in ds)
        before = ds[0].records()
        start = time.perf_counter()
        for p in staged:
            os.rename(p, root / "inbox" / p.name)
        end = ds[0].wait_records(before + n)
        cpu = sum(d.cpu_seconds() for d in ds) - cpu
        t_d = end - start
        ratios.append(t_bare / t_d)
        who = "daemon" if daemons == 1 else f"{daemons} daemons on one root"
        print(f"round {r + 1}: {n} PNGs dropped at once: {who} {n / t_d:.0f} files/s, bare loop {n / t_bare:.0f} "
              f"files/s, ratio {t_bare / t_d:.2f}x; CPU per file: daemon {cpu / n * 1000:.2f} ms (all its "
              f"processes), bare loop {cpu_bare / n * 1000:.2f} ms", flush=True)
    for d in ds:
        d.stop()
    print(f"{n} PNGs dropped at once: median ratio {float(np.median(ratios)):.2f}x over {rounds} rounds")


def _tiles(n: int, side: int = 128, seed: int = 0) -> np.ndarray:
    """Grey 'inspection' images: a lit cell with grooves, grain and a little jitter in place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    out = np.empty((n, side, side), np.uint8)
    for i in range(n):
        dy, dx = rng.integers(-2, 3, 2)
        base = np.where(((yy + dy) % 32 < 3) | ((xx + dx) % 40 < 3), 0.3, 0.7) + rng.normal(0, 0.05, (side, side))
        out[i] = np.clip(base * 255, 0, 255).astype(np.uint8)
    return out


def _bare_model_loop(paths: list[Path], out: Path | None, scorer, batch: int = 64) -> float:
    """Decode, score in batches with the compiled model, and (with ``out``) rename + fsync'd record per file."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        x = []
        for p in chunk:
            with Image.open(p) as img:
                x.append(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
        scores = scorer.score(np.stack(x)[..., None])
        if out is None:
            continue
        for p, s in zip(chunk, scores, strict=True):
            dest = out / p.name
            os.rename(p, dest)
            with open(str(dest) + ".json", "w") as fp:
                json.dump({"item": p.name, "verdict": "ok", "score": float(s)}, fp)
                fp.flush()
                os.fsync(fp.fileno())
    return time.perf_counter() - start


def bench_real(tmp: Path, n: int) -> None:
    from aemon.bundle import load_bundle
    from aemon.cli import main as aemon_main

    _write_pngs(tmp / "train", _tiles(400, seed=1))
    bundle_dir = tmp / "bundle"
    if aemon_main(["train", "--data", str(tmp / "train"), "--out", str(bundle_dir)]) != 0:
        raise RuntimeError("training the 128x128 bundle failed")
    bundle = load_bundle(bundle_dir)
    print(f"128x128 bundle: {bundle.meta.arch} {bundle.meta.latent_dim}, score {bundle.meta.score_fn}")
    images = _tiles(n, seed=2)
    t_score = _bare_model_loop(_write_pngs(tmp / "score_src", images), None, bundle.scorer)
    t_bare = _bare_model_loop(_write_pngs(tmp / "bare_src", images), tmp / "bare_out", bundle.scorer)
    staged = _write_pngs(tmp / "stage_real", images)
    root = tmp / "root_real"
    d = _Daemon(root, AEMON_MODEL=str(bundle_dir))
    start = time.perf_counter()
    for p in staged:
        os.rename(p, root / "inbox" / p.name)
    end = d.wait_records(n)
    d.stop()
    t_d = end - start
    print(f"{n} 128x128 PNGs dropped at once: daemon {n / t_d:.0f} files/s; bare loop with the same compiled model "
          f"and fsync'd records {n / t_bare:.0f} files/s (ratio {t_bare / t_d:.2f}x); decode + score only "
          f"{n / t_score:.0f} files/s (ratio {t_score / t_d:.2f}x)")


class _FsyncProbe:
    """Writes and fsyncs 100 bytes in ``folder`` every 10 ms on a thread of its own: when the filesystem
    itself holds fsync up (an ext4 journal commit, the disk), the probe waits too, whatever the daemon does."""

    def __init__(self, folder: Path) -> None:
        import threading

        self.path = folder / "fsync-probe.bin"
        self.times: list[tuple[float, float]] = []  # (start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.time()
            with open(self.path, "wb") as fh:
                fh.write(b"x" * 100)
                fh.flush()
                os.fsync(fh.fileno())
            self.times.append((start, time.time() - start))
            time.sleep(0.01)

    def stop(self) -> list[tuple[float, float]]:
        """The probe's stalls over 100 ms: (start, seconds)."""
        self._stop.set()
        self._thread.join()
        return [(t, s) for t, s in self.times if s > 0.1]


def bench_latency(tmp: Path, rate: float, seconds: float) -> None:
    n = int(rate * seconds)
    staged = _write_pngs(tmp / "stage_lat", _digits(n), prefix="l")
    # The staged files on disk first: ext4 commits their data with the daemon's first fsyncs otherwise,
    # a stall of the writer's making in the first seconds of the run.
    os.sync()
    d = _Daemon(tmp / "root_lat", AEMON_BATCH_WAIT_MS="2")
    probe = _FsyncProbe(tmp)
    dropped: dict[str, float] = {}
    t0 = time.time()
    for i, p in enumerate(staged):
        target = t0 + i / rate
        delay = target - time.time()
        if delay > 0:
            time.sleep(delay)
        os.rename(p, d.root / "inbox" / p.name)
        dropped[p.name] = time.time()
    d.wait_records(n)
    stalls = probe.stop()
    d.stop()
    lat = []
    for folder in ("ok", "anomaly"):
        for rec in (d.root / folder).glob("*.json"):
            name = rec.name.removesuffix(".json")
            if name in dropped:
                lat.append((dropped[name], rec.stat().st_mtime - dropped[name]))
    lat_ms = np.array([s for _, s in lat]) * 1000
    print(f"latency at {rate:.0f} files/s for {seconds:.0f} s ({len(lat_ms)} files): "
          f"p50 {np.percentile(lat_ms, 50):.1f} ms, p99 {np.percentile(lat_ms, 99):.1f} ms, max {lat_ms.max():.1f} ms")
    # Which slow items were waiting while the filesystem held fsync up (a probe stall ending after their
    # arrival and starting before their record).
    slow = [(t, s) for t, s in lat if s > 0.05]
    held = sum(any(start < t + s and start + took > t for start, took in stalls) for t, s in slow)
    longest = max((took for _, took in stalls), default=0.0)
    print(f"  fsync probe beside the daemon (100 bytes every 10 ms): {len(stalls)} stalls over 100 ms "
          f"(longest {longest * 1000:.0f} ms); items over 50 ms: {len(slow)}, of which {held} waited "
          "while the probe was held up too")


def bench_array(tmp: Path) -> None:
    from aemon.logs import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    from aemon.bundle import default_bundle_path, load_bundle
    from aemon.images import array_to_input

    raw = _digits(10_000)
    x = array_to_input(raw)
    model = load_bundle(default_bundle_path("detect")).model
    call = tf.function(lambda v: model(v, training=False),
                       input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32)])
    call(x[:64])

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, len(x), 1024):
            call(x[i : i + 1024]).numpy()
        return time.perf_counter() - start

    d = _Daemon(tmp / "root_arr")
    # Each array right after a bare call (the daemon idle): the bare call's own time swings by a
    # third between runs here, so each array is compared with the call just before it.
    pairs = [(bare(), _one_array(d, tmp, raw, f"arr{i}.npy")) for i in range(4)]
    d.stop()
    ratios = [b / t for b, t in pairs]
    print(f"10,000-row .npy: daemon {pairs[0][1] * 1000:.0f} ms for the first array of its life, then "
          f"{', '.join(f'{t * 1000:.0f}' for _, t in pairs[1:])} ms (arrival to last record); bare compiled call "
          f"just before each {', '.join(f'{b * 1000:.0f}' for b, _ in pairs)} ms; ratio "
          f"{float(np.median(ratios[1:])):.2f}x (median of the later ones), {ratios[0]:.2f}x (first)")


def _one_array(d: _Daemon, tmp: Path, raw: np.ndarray, name: str) -> float:
    """Seconds from one array renamed into the inbox to its last record, with nothing else pending."""
    staged = tmp / name
    np.save(staged, raw)
    start = time.perf_counter()
    os.rename(staged, d.root / "inbox" / name)
    parts = 0
    while parts == 0 or any((d.root / f / name).exists() and not (d.root / f / f"{name}.json").exists()
                            for f in ("ok", "anomaly")) or (d.root / "inbox" / name).exists() \
            or _claims_pending(d.root):
        parts = sum((d.root / f / f"{name}.json").exists() for f in ("ok", "anomaly"))
        time.sleep(0.005)
    return time.perf_counter() - start


def _claims_pending(root: Path) -> bool:
    """True while a batch folder exists under any daemon's claims folder."""
    return any(batch.is_dir() and not batch.name.startswith(".")
               for owner in (root / ".aemon" / "claims").iterdir() if owner.is_dir() for batch in owner.iterdir())


def bench_rss(tmp: Path, first: int, last: int) -> None:
    d = _Daemon(tmp / "root_rss", AEMON_SETTLE_SECONDS="0.2")
    images = _digits(min(max(first, 5000), last))
    stage = tmp / "stage_rss"
    done, rss_first = 0, None
    while done < last:
        block = min(first if rss_first is None else len(images), last - done)
        for p in _write_pngs(stage, images[:block], prefix=f"r{done:07d}_"):
            os.rename(p, d.root / "inbox" / p.name)
        done += block
        d.wait_records(done)
        if rss_first is None:
            rss_first = d.rss_mb()
        d.clear_outputs()
    rss_last = d.rss_mb()
    d.stop()
    print(f"RSS after {first} items: {rss_first:.0f} MB; after {last} items: {rss_last:.0f} MB "
          f"({(rss_last / rss_first - 1) * 100:+.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rss-items", type=int, nargs=2, default=[1000, 50000])
    parser.add_argument("--only", choices=["ready", "throughput", "latency", "array", "rss", "real"])
    parser.add_argument("--daemons", type=int, default=1, help="replicas on one root for the throughput figure")
    parser.add_argument("--rounds", type=int, default=3, help="bare loop + burst rounds for the throughput figure")
    parser.add_argument("--workers", help="AEMON_WORKERS for every daemon (default: the daemon's own, the cores)")
    args = parser.parse_args()
    if args.workers:
        os.environ["AEMON_WORKERS"] = args.workers  # every daemon started below inherits it
    print(f"AEMON_WORKERS={os.environ.get('AEMON_WORKERS', 'default (the cores)')}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.only == "ready":
            bench_ready(tmp)
        if args.only in (None, "throughput"):
            bench_throughput(tmp, args.files, args.daemons, args.rounds)
        if args.only in (None, "latency"):
            bench_latency(tmp, args.rate, args.seconds)
        if args.only in (None, "array"):
            bench_array(tmp)
        if args.only in (None, "rss"):
            bench_rss(tmp, *args.rss_items)
        if args.only in (None, "real"):
            bench_real(tmp, min(args.files, 3000))


if __name__ == "__main__":
    main()
