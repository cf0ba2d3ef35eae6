"""Settings precedence and validation (aemon.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aemon.errors import UsageError
from aemon.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without AEMON_* variables from the outer environment."""
    import os

    for name in list(os.environ):
        if name.startswith("AEMON_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aemon.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    """Without a file, environment or flags the documented defaults apply."""
    s = load_settings()
    assert s.batch_size == 64 and s.mode == "detect" and s.metrics_port == 9108
    assert s.root == Path("aemon-data") and s.model is None and s.polling is False


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    """A TOML file given with config= overrides the defaults."""
    s = load_settings(_toml(tmp_path, 'batch_size = 8\nmode = "denoise"\n'))
    assert s.batch_size == 8 and s.mode == "denoise"


def test_aemon_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AEMON_CONFIG names the TOML file when no config= is given."""
    monkeypatch.setenv("AEMON_CONFIG", str(_toml(tmp_path, "batch_size = 9\n")))
    assert load_settings().batch_size == 9


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AEMON_* variables override the TOML file."""
    path = _toml(tmp_path, "batch_size = 8\nsettle_seconds = 2.5\n")
    monkeypatch.setenv("AEMON_BATCH_SIZE", "16")
    monkeypatch.setenv("AEMON_POLLING", "true")
    s = load_settings(path)
    assert s.batch_size == 16 and s.settle_seconds == 2.5 and s.polling is True


def test_flags_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags override AEMON_* variables; a flag of None means not given."""
    path = _toml(tmp_path, "batch_size = 8\nmetrics_port = 9000\n")
    monkeypatch.setenv("AEMON_BATCH_SIZE", "16")
    monkeypatch.setenv("AEMON_MODE", "denoise")
    s = load_settings(path, batch_size=32, mode=None)
    assert s.batch_size == 32 and s.mode == "denoise" and s.metrics_port == 9000


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"flag": {"batch_size": -1}}, "batch_size"),
        ({"env": ("AEMON_BATCH_SIZE", "-5")}, "AEMON_BATCH_SIZE"),
        ({"env": ("AEMON_MODE", "explode")}, "mode"),
        ({"toml": 'mode = "explode"\n'}, "mode"),
        ({"toml": "no_such_setting = 1\n"}, "no_such_setting"),
        ({"env": ("AEMON_METRICS_PORT", "70000")}, "metrics_port"),
    ],
)
def test_bad_values_one_line_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: dict,
                                         match: str) -> None:
    """Bad values from flags, environment or file raise one-line UsageError naming the setting."""
    config = None
    flags = source.get("flag", {})
    if "env" in source:
        monkeypatch.setenv(*source["env"])
    if "toml" in source:
        config = _toml(tmp_path, source["toml"])
    with pytest.raises(UsageError, match=match) as info:
        load_settings(config, **flags)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_missing_and_invalid_config_file(tmp_path: Path) -> None:
    """A missing or malformed TOML file is a UsageError."""
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "none.toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_settings(_toml(tmp_path, "batch_size = = 3\n"))


def test_log_level_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """AEMON_LOG_LEVEL accepts lower case."""
    monkeypatch.setenv("AEMON_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_toml_file_not_sticky(tmp_path: Path) -> None:
    """A config file used once does not leak into the next load_settings call."""
    load_settings(_toml(tmp_path, "batch_size = 8\n"))
    assert load_settings().batch_size == 64


def test_cgroup_cpu_quota_reads_v1_and_v2_and_takes_the_tightest(tmp_path: Path) -> None:
    """cpu.max (v2) and cfs_quota_us/cfs_period_us (v1), on the group or an ancestor; "max"/-1 is no limit."""
    from aemon.settings import cgroup_cpu_quota

    own = tmp_path / "cgroup"
    mounts = tmp_path / "fs"
    pod = mounts / "kubepods" / "pod1"
    (pod / "c1").mkdir(parents=True)
    (mounts / "kubepods" / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("250000 100000\n")
    (pod / "c1" / "cpu.max").write_text("max 100000\n")
    own.write_text("0::/kubepods/pod1/c1\n")
    assert cgroup_cpu_quota(str(mounts), str(own)) == 2.5
    (pod / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(mounts), str(own)) is None
    v1 = mounts / "cpu"
    v1.mkdir()  # inside a container: the controller's mount is the container's own group
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert cgroup_cpu_quota(str(mounts), str(own)) == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(str(mounts), str(own)) is None
    assert cgroup_cpu_quota(str(mounts), str(tmp_path / "missing")) is None


@pytest.mark.parametrize("text", ["batch_size = true\n", 'workers = "3"\n', "settle_seconds = true\n",
                                  'polling = "no"\n', "batch_wait_ms = '5'\n", "metrics_host = 127\n"])
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, text: str) -> None:
    """TOML has types: `batch_size = true` became 1 and `polling = "no"` False without a word (a review)."""
    with pytest.raises(UsageError, match=text.split(" =")[0]):
        load_settings(_toml(tmp_path, text))


def test_toml_numbers_as_toml_writes_them(tmp_path: Path) -> None:
    """An integer is a fine float (settle_seconds = 2), and the right types pass."""
    s = load_settings(_toml(tmp_path, 'settle_seconds = 2\nbatch_wait_ms = 5.5\npolling = true\nroot = "r"\n'))
    assert s.settle_seconds == 2.0 and s.batch_wait_ms == 5.5 and s.polling is True and s.root == Path("r")
