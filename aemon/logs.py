"""structlog set-up (once per process) and TensorFlow's start-up noise kept quiet."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import structlog

__all__ = ["configure", "quiet_tensorflow", "get_logger"]


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ and Python start-up chatter off the user's terminal.

    Must run before TensorFlow is imported; safe to call many times.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # oneDNN prints a banner on import and gains nothing for models this small.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="tensorflow")
    warnings.filterwarnings("ignore", module="keras")


def configure(fmt: str | None = None, level: str = "INFO", stream=None, **fields) -> None:
    """Configure structlog: one event per line, JSON or readable console lines.

    Args:
        fmt: ``json`` or ``console``; ``None`` picks JSON unless the stream is a terminal.
        level: Lowest level logged.
        stream: Where lines go (stdout by default).
        fields: Added to every event of this process, on every thread (a worker's index).
    """
    stream = stream or sys.stdout
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *([_add_fields(fields)] if fields else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _readable_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per event, newline included: print() writes the newline apart, and with an unbuffered
        # stdout (PYTHONUNBUFFERED, as in the container) two processes on one log glued their lines together.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    warnings.showwarning = _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (Pillow's about a file's metadata) as one ``library.warning`` event, not the two
    plain lines Python prints on stderr, which would break a JSON log."""
    get_logger().warning("library.warning", category=category.__name__, message=str(message),
                         where=f"{filename}:{lineno}")


def readable(text: str) -> str:
    """``text`` as valid Unicode: a file name that is not valid UTF-8 (kept by Python as surrogate escapes,
    which strict JSON parsers refuse and a UTF-8 stream cannot print) shows U+FFFD for each byte it cannot
    decode."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _readable_values(logger, method: str, event_dict: dict) -> dict:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = readable(value)
    return event_dict


def _add_fields(fields: dict):
    def add(logger, method: str, event_dict: dict) -> dict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def get_logger(**context) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger bound to ``context``."""
    return structlog.get_logger(**context)
