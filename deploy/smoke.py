"""Run every aemon verb once, and the daemon on one item, on tiny data.

The image build runs it in its trimmed environment (``python deploy/smoke.py``), so a trim that
breaks a verb fails the build, and Python's bytecode is written for exactly the modules the verbs
and the daemon import. Also usable on any install: exit 0 when everything worked.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MNIST = "sample:mnist?limit=300"


#: -P and a scratch working folder: the installed aemon runs (and gets its bytecode), never a source tree
#: beside this script.
QUIET = {**os.environ, "AEMON_LOG_LEVEL": "WARNING", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONSAFEPATH": "1"}
#: The daemon's HTTP port is local: never through a proxy that the build may have in its environment.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_aemon(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-P", "-m", "aemon", *args], check=True, stdout=subprocess.DEVNULL, env=QUIET,
                   cwd=cwd, timeout=900)


def verbs(tmp: Path) -> None:
    aemon = functools.partial(run_aemon, cwd=tmp)
    aemon("samples", str(tmp / "samples"))
    aemon("score", "mnist-detect", "sample:mnist?limit=20", "--maps", str(tmp / "maps"))
    aemon("denoise", "mnist-denoise", str(tmp / "samples"), "--out", str(tmp / "denoised"))
    aemon("train", "--data", MNIST, "--out", str(tmp / "auto"))
    aemon("train", "--data", MNIST, "--arch", "dense", "--epochs", "1", "--out", str(tmp / "dense"))
    aemon("calibrate", str(tmp / "dense"), "--data", "sample:mnist?limit=200", "--out", str(tmp / "recal"))
    aemon("evaluate", str(tmp / "auto"), "--normal", "sample:mnist?digits=1&limit=100",
          "--anomalous", "sample:mnist?digits=0&limit=100", "--report", str(tmp / "report"))
    aemon("info", str(tmp / "auto"))


def daemon(tmp: Path) -> None:
    """Start the daemon, route one sample image, stop it with SIGTERM (exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp / "root"
    (root / "inbox").mkdir(parents=True)
    env = {**QUIET, "AEMON_ROOT": str(root), "AEMON_METRICS_PORT": str(port), "AEMON_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "aemon", "run"], env=env, stdout=subprocess.DEVNULL, cwd=tmp)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with LOCAL.open(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("smoke: the daemon did not become ready") from None
                time.sleep(0.2)
        sample = next((tmp / "samples").iterdir())
        os.link(sample, root / "inbox" / sample.name)
        while not any((root / f / f"{sample.name}.json").exists() for f in ("ok", "anomaly")):
            if time.monotonic() > deadline:
                raise SystemExit("smoke: the sample was not routed")
            time.sleep(0.1)
        with LOCAL.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            response.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("smoke: the daemon did not stop within 60 s of SIGTERM") from None
    if code != 0:
        raise SystemExit(f"smoke: the daemon exited {code}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        verbs(Path(tmp))
        daemon(Path(tmp))
        where = subprocess.run([sys.executable, "-P", "-c", "import aemon; print(aemon.__file__)"], cwd=tmp,
                               env=QUIET, capture_output=True, text=True, check=True).stdout.strip()
    print(f"smoke: every verb and the daemon worked (aemon from {where})")


if __name__ == "__main__":
    main()
