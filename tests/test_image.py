"""The container image, really built and run: deploy/build-image.sh builds it with buildah from a local Debian base
(no registry, no daemon), then podman runs it as uid 10001 on a volume, a real digit is routed, /readyz and the
image's own HEALTHCHECK answer, and SIGTERM stops it with exit 0.

Slow (a few minutes the first time: debootstrap, then pip downloads TensorFlow). Needs root: the script installs
buildah, podman, runc and debootstrap with apt-get when they are missing.

    .venv/bin/python -m pytest -m slow -q -s tests/test_image.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: A cold first build (tools, debootstrap, TensorFlow downloaded) takes 5-10 minutes: above the suite's 600 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "build-image.sh"
TAG = "localhost/aemon:test"
NAME = "aemon-image-test"
UID = 10001
#: podman as root, on any host: runc with cgroupfs (crun refuses hosts with hybrid cgroup v1/v2), and explicit
#: limits (the runtime's own defaults may be above what a sandboxed host lets it set), host networking on a free
#: port (no CNI/netavark set-up needed).
PODMAN_RUN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=8192:8192", "--ulimit", "nproc=4096:4096"]


def _need_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap, buildah and podman storage in /var/lib/containers): "
                    "run as root; deploy/build-image.sh then installs buildah, podman, runc and debootstrap")
    if not shutil.which("apt-get"):
        for tool in ("buildah", "podman", "runc", "debootstrap"):
            if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
                pytest.skip(f"{tool} is not installed and there is no apt-get to install it "
                            f"(Debian package {tool})")


def _run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def image() -> dict:
    """Build the image with deploy/build-image.sh; yield its Docker-format config (buildah inspect)."""
    _need_root_and_tools()
    start = time.monotonic()
    done = subprocess.run([str(SCRIPT), TAG], capture_output=True, text=True, timeout=3600)
    if done.returncode == 2 and "missing" in done.stderr and "apt-get" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    size = _run("buildah", "images", "--format", "{{.Size}}", TAG).stdout.strip()
    print(f"\nimage {TAG}: {size}, built in {time.monotonic() - start:.0f} s")
    info = json.loads(_run("buildah", "inspect", "--type", "image", TAG).stdout)
    return info


def test_image_config_keeps_healthcheck_and_non_root_user(image):
    """Docker format: the HEALTHCHECK (dropped by the OCI format) probes /healthz; uid 10001; /data volume."""
    config = image["Docker"]["config"]
    health = config.get("Healthcheck") or {}
    assert health.get("Test", [])[:2] == ["CMD", "/opt/aemon/bin/python"], health
    assert "/healthz" in health["Test"][-1]
    assert health["Interval"] == 30 * 10**9 and health["Retries"] == 3
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["aemon"] and config["Cmd"] == ["run"]
    assert "/data" in config["Volumes"]
    assert "AEMON_ROOT=/data" in config["Env"]


def test_image_runs_non_root_routes_a_digit_and_stops_on_sigterm(image, tmp_path):
    """podman runs the image on a volume: a real digit dropped into inbox/ gets its verdict and record, /readyz is
    200, the image's HEALTHCHECK passes, and SIGTERM (podman stop) ends it with exit 0."""
    from aemon.sources import sample_mnist

    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    port = _free_port()
    _run("podman", "rm", "-f", "--ignore", NAME)
    _run(*PODMAN_RUN, "run", "-d", "--name", NAME, *LIMITS, "--network", "host", "-v", f"{data}:/data",
         "-e", "AEMON_METRICS_HOST=127.0.0.1", "-e", f"AEMON_METRICS_PORT={port}", "-e", "AEMON_SETTLE_SECONDS=0.2",
         TAG)
    try:
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        deadline = start + 300
        while _status(url + "/readyz") != 200:
            state = _run("podman", "inspect", "--format", "{{.State.Status}}", NAME).stdout.strip()
            logs = _run("podman", "logs", NAME, check=False)
            assert state == "running", f"container {state}:\n{logs.stdout[-5000:]}{logs.stderr[-5000:]}"
            assert time.monotonic() < deadline, "never ready:\n" + logs.stdout[-5000:] + logs.stderr[-5000:]
            time.sleep(0.5)
        print(f"\ncontainer ready in {time.monotonic() - start:.0f} s")
        # The image's own HEALTHCHECK command, run inside the container by podman.
        _run("podman", "healthcheck", "run", NAME, timeout=60)

        x, _ = sample_mnist()
        pixels = x[0].reshape(28, 28).astype(np.uint8)
        inbox = data / "inbox"
        staged = inbox / ".digit.png"  # a dot name is never taken: rename into place when complete
        Image.fromarray(pixels).save(staged)
        staged.rename(inbox / "digit.png")

        records: list[Path] = []
        deadline = time.monotonic() + 120
        while not records and time.monotonic() < deadline:
            records = [p for v in ("ok", "anomaly") if (p := data / v / "digit.png.json").exists()]
            time.sleep(0.2)
        logs = _run("podman", "logs", NAME, check=False)
        assert records, "no record:\n" + logs.stdout[-5000:] + logs.stderr[-5000:]
        record = json.loads(records[0].read_text())
        assert record["item"] == "digit.png" and record["verdict"] == records[0].parent.name
        assert isinstance(record["score"], float) and record["score"] >= 0
        assert (records[0].parent / "digit.png").is_file()
        assert records[0].stat().st_uid == UID, "the daemon ran as root"
        assert _status(url + "/readyz") == 200

        _run("podman", "stop", "-t", "60", NAME, timeout=90)
        code = _run("podman", "inspect", "--format", "{{.State.ExitCode}}", NAME).stdout.strip()
        logs = _run("podman", "logs", NAME, check=False)
        assert code == "0", logs.stdout[-5000:] + logs.stderr[-5000:]
    finally:
        _run("podman", "rm", "-f", "--ignore", NAME, check=False)
