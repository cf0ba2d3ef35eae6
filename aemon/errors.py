"""The exception hierarchy: one root, leaves only where callers act differently."""

from __future__ import annotations

import errno

__all__ = [
    "AemonError",
    "UsageError",
    "StartupError",
    "BundleError",
    "SourceError",
    "CalibrationError",
    "ItemRejected",
    "Unreadable",
    "BadShape",
    "TooLarge",
    "UnsupportedType",
    "EmptyItem",
    "UnsafeItem",
    "NameTooLong",
    "IgnoredName",
]


class AemonError(Exception):
    """Root of every error aemon raises on purpose; the CLI prints its message as one line."""

    #: Process exit status when this error ends a command.
    exit_code: int = 1


class UsageError(AemonError):
    """A bad flag, setting or argument: the user must change the command."""

    exit_code = 2


class StartupError(AemonError):
    """The daemon cannot start (missing root, unusable folders, no model)."""

    exit_code = 3

    @classmethod
    def unusable_root(cls, root: object, exc: OSError) -> AemonError:
        """The root (or a folder under it) failed with ``exc`` (see :meth:`of`)."""
        return cls.of(f"root folder {root} is not usable: {exc}; check its permissions or set AEMON_ROOT", exc)

    @classmethod
    def of(cls, message: str, exc: OSError) -> AemonError:
        """A start-up failure from a filesystem error: exit 3, not to be restarted, unless the filesystem is only
        full (ENOSPC, EDQUOT), which passes: then exit 1, so that the supervisor starts the daemon again."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return AemonError(f"{message} (the filesystem is full: exit 1, for the supervisor to start again)")
        return cls(message)


class BundleError(AemonError):
    """A model bundle is missing, tampered with, or of an unknown format."""


class SourceError(AemonError):
    """A data source (SRC) cannot be read into images."""


class CalibrationError(AemonError):
    """The threshold cannot be calibrated on the data given."""


class ItemRejected(AemonError):
    """One input item cannot be scored; it goes to ``rejected/`` and the loop goes on."""

    #: Machine word written to the record's ``reason`` field.
    reason: str = "unreadable"


class Unreadable(ItemRejected):
    """The bytes are not a decodable image or array."""

    reason = "unreadable"


class BadShape(ItemRejected):
    """The image or array has a shape the bundle cannot take."""

    reason = "bad_shape"


class TooLarge(ItemRejected):
    """The item exceeds the configured size or pixel limits (decompression bombs included)."""

    reason = "too_large"


class UnsupportedType(ItemRejected):
    """The file type is not an image or array aemon reads."""

    reason = "unsupported_type"


class EmptyItem(ItemRejected):
    """The item holds no images (zero bytes, zero rows, empty folder)."""

    reason = "empty"


class UnsafeItem(ItemRejected):
    """The item could run code or escape the inbox (pickles, object arrays, symlinks)."""

    reason = "unsafe"


class NameTooLong(ItemRejected):
    """A name or path too long for the filesystem once aemon adds its suffixes and folders."""

    reason = "name_too_long"


class IgnoredName(ItemRejected):
    """A file inside a folder batch whose name is never taken (hidden, partial, backup)."""

    reason = "ignored_name"


class Crashed(ItemRejected):
    """A process of the daemon died while deciding the item, again when it was tried alone (out of memory, a
    crash in a decoder): it is not tried again."""

    reason = "crashed"
