"""All configuration, in one pydantic-settings object (the only module that reads the environment).

Precedence, lowest first: defaults < TOML file (``--config`` or ``AEMON_CONFIG``) <
``AEMON_*`` environment variables < values passed by the CLI (flags).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from aemon.errors import UsageError

__all__ = ["Settings", "load_settings", "config_path_from_env", "unknown_env_names"]


class Settings(BaseSettings):
    """Every setting of aemon; each field is also ``AEMON_<NAME>`` and a TOML key."""

    model_config = SettingsConfigDict(env_prefix="AEMON_", extra="forbid", validate_default=True)

    #: Folder holding inbox/, ok/, anomaly/, rejected/, denoised/ and .aemon/.
    root: Path = Path("aemon-data")
    #: Bundle directory; empty means the default bundle shipped for the mode.
    model: Path | None = None
    #: ``detect`` scores and routes; ``denoise`` writes denoised images as well.
    mode: Literal["detect", "denoise"] = "detect"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535)
    #: Most items scored in one model call.
    batch_size: int = Field(64, ge=1, le=4096)
    #: Longest wait for a batch to fill before scoring what has arrived.
    batch_wait_ms: float = Field(5.0, ge=0, le=60_000)
    #: A file written in place is taken once unchanged for this long.
    settle_seconds: float = Field(1.0, ge=0, le=3600)
    #: Use a polling observer (network filesystems) instead of inotify.
    polling: bool = False
    #: Full rescan of the inbox every this many seconds (safety net for missed events).
    rescan_seconds: float = Field(5.0, gt=0, le=3600)
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: Largest file accepted, in bytes.
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1)
    #: Largest image accepted, in pixels.
    max_image_pixels: int = Field(40_000_000, ge=1)
    #: Largest number of rows in one array item.
    max_array_rows: int = Field(1_000_000, ge=1)
    #: Anomaly maps: of anomalous items (``anomaly``), of every item (``all``) or none (``off``).
    maps: Literal["anomaly", "all", "off"] = "anomaly"
    #: Processes that decode, score and commit (the main one and ``workers - 1`` more).
    workers: int = Field(default_factory=lambda: cores(), ge=1, le=64)
    #: Seconds allowed to finish the batch in flight on SIGTERM.
    shutdown_grace_seconds: float = Field(10.0, ge=0, le=3600)

    _toml_table: ClassVar[dict[str, Any] | None] = None

    @property
    def limits(self):
        """The item size limits (:class:`aemon.images.Limits`)."""
        from aemon.images import Limits

        return Limits(max_bytes=self.max_file_bytes, max_pixels=self.max_image_pixels, max_rows=self.max_array_rows)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("root", mode="before")
    @classmethod
    def _root_not_empty(cls, value: Any) -> Any:
        if isinstance(value, str | Path) and not str(value).strip():
            raise ValueError("is empty; set it to the folder that holds inbox/ (an empty root never means "
                             "the current folder)")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_default(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_table is not None:  # the table load_settings read and checked, never read again
            sources.append(InitSettingsSource(settings_cls, init_kwargs=cls._toml_table))
        return tuple(sources)


def cores() -> int:
    """The cores this process may use: the CPUs it may run on, capped by a cgroup CPU quota (a
    container's ``--cpus``, a Kubernetes CPU limit) rounded up."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(mounts: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> float | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroup or its ancestors (cgroup v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None without one."""
    try:
        lines = Path(own).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = Path(mounts), ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1 (cpu or cpu,cpuacct)
            base, files = Path(mounts) / "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        # The process's own group and its ancestors; inside a container the controller's mount is
        # often the container's group itself, whatever the path says.
        parts = [p for p in path.split("/") if p]
        for folder in [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]:
            quota = _quota_in(folder, files)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _quota_in(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            limit, period = (folder / files[0]).read_text().split()[:2]
        else:
            limit, period = ((folder / name).read_text().strip() for name in files)
        if limit in ("max", "-1") or float(period) <= 0:
            return None
        return float(limit) / float(period)
    except (OSError, ValueError):
        return None


def config_path_from_env() -> Path | None:
    """The TOML file named by ``AEMON_CONFIG``, if any."""
    value = os.environ.get("AEMON_CONFIG")
    return Path(value) if value else None


def unknown_env_names() -> list[str]:
    """``AEMON_*`` variables of the environment that name no setting (misspellings, such as ``AEMON_BATCHSIZE``)."""
    known = {f"AEMON_{name.upper()}" for name in Settings.model_fields} | {"AEMON_CONFIG"}
    return sorted(name for name in os.environ if name.upper().startswith("AEMON_") and name.upper() not in known)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "settings"
        name = f"{where} (AEMON_{where.upper()})" if item["type"] != "extra_forbidden" else where
        parts.append(f"{name}: {item['msg']} (got {item.get('input')!r})")
    return "invalid settings: " + "; ".join(parts)


#: Per kind of setting: whether a TOML value fits it, and how to ask for one (an int will do for a float;
#: a boolean is never a number).
_TOML_KINDS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}
_TOML_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def _mistyped(table: dict[str, Any]) -> list[str]:
    """One phrase per TOML value of the wrong type: TOML has types, and ``batch_size = true`` or
    ``workers = "3"`` were coerced (to 1 and 3) where a typo deserves an error. Unknown keys are left to
    validation, which names them; settings that are not bool, int or float (paths, choices) take strings."""
    wrong = []
    for key, value in table.items():
        field = Settings.model_fields.get(key)
        if field is None:
            continue
        fits, want = _TOML_KINDS[field.annotation if field.annotation in _TOML_KINDS else str]
        if not fits(value):
            wrong.append(f"{key} = {value!r} is {_TOML_NAMES.get(type(value), type(value).__name__)}; give {want}")
    return wrong


def load_settings(config: Path | None = None, **flags: Any) -> Settings:
    """Build the settings from defaults, the TOML file, the environment and flags.

    Args:
        config: A TOML file; falls back to ``AEMON_CONFIG``.
        flags: Values given on the command line; ``None`` means "not given".

    Raises:
        UsageError: one line naming each bad value.
    """
    path = config or config_path_from_env()
    if path is not None:
        if path.is_dir():
            raise UsageError(f"config file {path} is a folder; AEMON_CONFIG and --config name a TOML file")
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise UsageError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
        wrong = _mistyped(table)
        if wrong:
            raise UsageError(f"config file {path}: {'; '.join(wrong)}")
    given = {k: v for k, v in flags.items() if v is not None}
    Settings._toml_table = table if path is not None else None
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise UsageError(_describe(exc)) from None
    finally:
        Settings._toml_table = None
