"""Decode one input (image file or array file) into model-ready pixels.

This is the single decoding path shared by the CLI, the training sources and the daemon.
Policy (also in the README):

* Images: converted to the bundle's colour mode, grayscale (Pillow ``L``: alpha dropped, palette
  and colour images use ITU-R 601 luma) or ``rgb`` (grey images repeated on three channels); the
  first frame of an animation is used; an image of another size is resized to the bundle's input
  size with bilinear filtering (aspect not kept); 8-bit pixels are scaled from 0–255 and 16-bit
  ones from 0–65535 to [0, 1]; float images (TIFF mode ``F``) follow the arrays' rule below.
* Arrays: grayscale bundles take ``(N, H, W)``, ``(N, H*W)`` or ``(N, H, W, 1)``, rgb bundles
  ``(N, H, W, 3)``, with H×W the bundle's input size. ``uint8`` (and other integer types holding
  0–255) are divided by 255; floats already in [0, 1] are used as they are; floats in (1, 255] are
  taken as 0–255 and divided by 255. Anything else (negative values, NaN, bool, complex, object)
  is refused.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aemon.errors import BadShape, EmptyItem, TooLarge, Unreadable, UnsafeItem, UnsupportedType
from aemon.structure import check_structure

__all__ = [
    "IMAGE_SUFFIXES",
    "PNG_LEVEL",
    "ARRAY_SUFFIXES",
    "Preprocessing",
    "Limits",
    "over_black",
    "is_image_name",
    "is_array_name",
    "open_file",
    "decode_image",
    "Look",
    "read_array",
    "npy_header",
    "array_to_input",
    "unit_pixels",
    "input_to_array",
    "Decoded",
    "decode",
    "decode_file",
]

#: File name endings read as images (Pillow decodes them).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
#: Pillow decoders an image may reach, whatever its name: the contract's formats only (no other plugin,
#: such as EPS with its Ghostscript, ever sees an item's bytes; camera JPEGs that Pillow calls MPO open as JPEG).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
#: EXIF orientations that turn the picture a quarter (its displayed width and height are swapped).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Pillow's own bomb limit is replaced by Limits.max_pixels, checked on the header before any decoding
# (Pillow's could neither be raised by the setting nor be named in the refusal).
Image.MAX_IMAGE_PIXELS = None
#: File name endings read as arrays of images (numpy, never with pickles).
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})


#: zlib level of the PNGs aemon writes (maps, denoised images): 3x faster than Pillow's default 6,
#: about 3 % larger.
PNG_LEVEL = 1


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input; stored in every bundle."""

    #: Colour mode every image is converted to: ``grayscale`` or ``rgb``.
    color_mode: str = "grayscale"
    #: Input height and width of the model.
    size: tuple[int, int] = (28, 28)
    #: ``unit``: 0–255 integers are divided by 255, floats in [0, 1] kept.
    scaling: str = "unit"

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for rgb."""
        return 3 if self.color_mode == "rgb" else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model's input shape, ``(H, W, C)``."""
        return (self.size[0], self.size[1], self.channels)

    def to_dict(self) -> dict:
        """Plain form for ``bundle.json``."""
        return {"color_mode": self.color_mode, "size": list(self.size), "scaling": self.scaling}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """Read the form written by :meth:`to_dict`.

        Raises:
            ValueError: a missing or malformed field, named.
        """
        size = data.get("size")
        if not (isinstance(size, list | tuple) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"size must be [height, width] in pixels, not {size!r}")
        color_mode = data.get("color_mode", "grayscale")
        if color_mode not in ("grayscale", "rgb"):
            raise ValueError(f"color_mode must be grayscale or rgb, not {color_mode!r}")
        scaling = data.get("scaling", "unit")
        if scaling != "unit":
            raise ValueError(f"scaling must be unit, not {scaling!r}")
        return cls(color_mode=color_mode, size=(size[0], size[1]), scaling=scaling)


@dataclass(frozen=True)
class Limits:
    """Size limits that keep a hostile or mistaken input from exhausting memory."""

    #: Largest file accepted, in bytes (uncompressed size for ``.npz``).
    max_bytes: int = 256 * 1024 * 1024
    #: Largest image accepted, in pixels (width × height), checked before decoding.
    max_pixels: int = 40_000_000
    #: Largest number of rows accepted in one array file.
    max_rows: int = 1_000_000


def is_image_name(name: str) -> bool:
    """True when the name ends in an image suffix aemon decodes."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_array_name(name: str) -> bool:
    """True when the name ends in ``.npy`` or ``.npz``."""
    return Path(name).suffix.lower() in ARRAY_SUFFIXES


def open_file(path: Path, limits: Limits) -> BinaryIO:
    """``path`` opened for reading, never through a link and never blocking on a FIFO, and checked to be a
    regular file within the size limit. Everything aemon reads of an item is read through this one file:
    a name swapped for a link after the check cannot lead the reader out of the folder.

    Raises:
        UnsafeItem: a symbolic link.
        UnsupportedType: not a regular file.
        EmptyItem, TooLarge, Unreadable: empty, over ``limits.max_bytes``, or not readable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeItem(f"{path.name} is a symbolic link, never followed; use the file itself") from exc
        raise Unreadable(f"cannot read {path.name}: {exc.strerror}") from exc
    fp = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsupportedType(f"{path.name} is not a regular file; only regular files are read")
        if info.st_size == 0:
            raise EmptyItem(f"{path.name} is empty (0 bytes)")
        if info.st_size > limits.max_bytes:
            raise TooLarge(f"{path.name} is {info.st_size} bytes; the limit is {limits.max_bytes} bytes")
    except BaseException:
        fp.close()
        raise
    return fp


def decode_image(path: Path, prep: Preprocessing = Preprocessing(), limits: Limits = Limits()) -> np.ndarray:
    """Decode one image file into a float32 array of shape ``(H, W, C)`` in [0, 1].

    Args:
        path: The image file.
        prep: The bundle's preprocessing (size and colour mode).
        limits: Size limits; the pixel limit is checked before any pixel is decoded.

    Raises:
        ItemRejected: a subclass naming why the file cannot be used.
    """
    with open_file(path, limits) as fp:
        return _image_pixels(fp, path.name, prep, limits)[0]


#: An image with a side longer than this is first reduced by whole steps (``Image.reduce``, averages of blocks)
#: to within :data:`RESIZE_GAP` times the bundle's size, then resized: the bilinear filter's table takes about
#: 16 bytes per pixel of the side, 0.7 GB for a 1x40,000,000 line PNG of 78 KB (within the pixel limit).
#: No camera frame has such a side: those decode exactly as they always did.
LONG_SIDE = 1 << 16
RESIZE_GAP = 64.0


def _image_pixels(fp: BinaryIO, name: str, prep: Preprocessing, limits: Limits) -> tuple[np.ndarray, Look]:
    """The pixels of the image in ``fp`` (see :func:`decode_image`) and how the file looks."""
    check_structure(fp, name)
    try:
        with open_image(fp, name) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise TooLarge(f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
            img.seek(0)
            if img.format == "TIFF" and _orientation(img) in _QUARTER_TURNS:
                # Pillow turns these itself, inconsistently (header size swapped, pixels not as shown)
                raise UnsupportedType(f"{name} is a TIFF with a quarter-turn EXIF orientation, which "
                                      "cannot be decoded as displayed; save it upright (or as PNG or JPEG)")
            mode = _own_mode(img)  # before anything loads the pixels (EXIF does, in a PNG): it reads the header
            look = Look(displayed_size(img), mode)
            converted = _convert(upright(img), prep.color_mode, name)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise Unreadable(f"{name} could not be decoded: {exc}") from exc
    if converted.size != (prep.size[1], prep.size[0]):
        gap = RESIZE_GAP if max(converted.size) > LONG_SIDE else None
        converted = converted.resize((prep.size[1], prep.size[0]), Image.Resampling.BILINEAR, reducing_gap=gap)
    pixels = np.asarray(converted, dtype=np.float32)
    if converted.mode in ("L", "RGB"):
        pixels /= 255.0  # in [0, 1] already
    else:
        pixels = np.clip(pixels, 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels, look


@dataclass(frozen=True)
class Look:
    """How an image file looks: its displayed ``(width, height)`` and Pillow mode (for outputs in kind)."""

    size: tuple[int, int]
    mode: str


def _own_mode(img: Image.Image) -> str:
    """The Pillow mode that keeps what ``img`` holds: ``L`` for a palette of greys only, ``I;16`` for a 16-bit
    grey PNG with alpha (which Pillow opens as 8-bit ``RGBA``), else its own."""
    if img.mode in ("P", "PA"):
        palette = np.asarray(img.getpalette("RGB") or [0, 0, 0], np.uint8).reshape(-1, 3)
        return "L" if (palette == palette[:, :1]).all() else img.mode
    if img.mode == "RGBA" and img.format == "PNG" and img.tile and img.tile[0].args == "LA;16B":
        return "I;16"
    return img.mode


def open_image(source: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """``source`` (a path or an open file) opened lazily (its header read, no pixel decoded) by the
    decoders of :data:`FORMATS` only.

    Raises:
        Unreadable: the file is none of those formats.
    """
    try:
        return Image.open(source, formats=FORMATS)
    except UnidentifiedImageError as exc:
        label = name or getattr(source, "name", "the file")
        raise Unreadable(f"{label} is not a PNG, JPEG, BMP, TIFF, WebP or GIF image") from exc


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1–8) as Pillow's ``exif_transpose`` applies it: a tag that is no number (text, a
    list) is ignored there, and so here, or the displayed size would be turned while the pixels are not;
    a rational or float 6 is 6 there, and here."""
    try:
        return _ORIENTATIONS.get(img.getexif().get(0x0112, 1), 1)  # a lookup, as Pillow's: 6.0 is 6, "6" none
    except (ValueError, TypeError, SyntaxError, OSError):  # a broken EXIF block: keep the pixels as stored
        return 1


_ORIENTATIONS = {value: value for value in range(1, 9)}


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned or mirrored as its EXIF orientation tag says (camera photos)."""
    return ImageOps.exif_transpose(img) if _orientation(img) != 1 else img


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as a viewer shows the image (from the header and EXIF, no pixel decoded)."""
    width, height = img.size
    return (height, width) if _orientation(img) in _QUARTER_TURNS else (width, height)


def over_black(img: Image.Image) -> Image.Image:
    """An image with transparency composited onto black (RGB); others unchanged. A fully transparent
    pixel is black whatever colour it stores, so two files that look the same decode the same."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def _convert(img: Image.Image, color_mode: str, name: str) -> Image.Image:
    """``L`` or ``RGB`` (8-bit), or for 16-bit and float images a float image (``F``) already
    scaled to [0, 1] (grey; repeated to 3 channels for rgb).

    Converting a 16-bit image to ``L`` would clip every value above 255 to white, and a float
    image in [0, 1] to black: floats follow the arrays' rule (:func:`unit_pixels`).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a transparent value (tRNS): those pixels are black, as in over_black
            values[values == key] = 0.0
        if values.size and (values.min() < 0 or values.max() > 65535):  # 32-bit: nothing but 16-bit values
            raise Unreadable(f"{name} has values in [{values.min():g}, {values.max():g}]; expected 0–65535 "
                             f"for a {img.mode} image")
        return Image.fromarray((values / 65535.0).astype(np.float32))
    if img.mode == "F":
        return Image.fromarray(unit_pixels(np.asarray(img, dtype=np.float32), name))
    img = over_black(img)
    if color_mode == "rgb":
        return img.convert("RGB")
    try:
        return img.convert("L")
    except ValueError:  # modes Pillow turns grey only by way of RGB (LAB)
        return img.convert("RGB").convert("L")


def npy_header(fp, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an ``.npy`` stream's header alone (no data read).

    Raises:
        Unreadable: not an ``.npy`` header.
    """
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    except (ValueError, OSError, SyntaxError, TypeError, OverflowError) as exc:
        if "max_header_size" in str(exc):  # numpy's advice (a larger limit, allow_pickle) is not for our users
            raise Unreadable(f"{name} is not a valid .npy array: its header is longer than numpy reads "
                             "(10,000 bytes)") from exc
        raise Unreadable(f"{name} is not a valid .npy array: {exc}") from exc
    if not all(type(n) is int and 0 <= n < 1 << 63 for n in shape):  # numpy checks less: (True, 784), 2**64
        raise Unreadable(f"{name} is not a valid .npy array: its header gives the shape {shape}")
    return shape, dtype


def _check_header(shape: tuple[int, ...], dtype: np.dtype, name: str, limits: Limits) -> None:
    if dtype.hasobject:
        raise UnsafeItem(f"{name} holds Python objects (pickles); aemon never unpickles, save numeric arrays")
    if len(shape) >= 1 and shape[0] > limits.max_rows:
        raise TooLarge(f"{name} has {shape[0]} rows; the limit is {limits.max_rows}")
    if len(shape) >= 2 and 0 in shape[1:]:
        raise EmptyItem(f"{name} has shape {shape}: its images have no pixels")
    nbytes = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
    if nbytes > limits.max_bytes:
        raise TooLarge(f"{name} holds {nbytes} bytes of data; the limit is {limits.max_bytes} bytes")


def _check_members(archive: zipfile.ZipFile, name: str) -> None:
    """Every member of an ``.npz`` can be read (its other arrays travel with the item's parts).

    Raises:
        Unreadable: a damaged, encrypted or oddly compressed member, or two members of one name
            (``x`` and ``x.npy`` count as one).
    """
    counts = Counter(member.removesuffix(".npy") for member in archive.namelist())
    twice = sorted(k for k, n in counts.items() if n > 1)  # 'x' beside 'x.npy' too: one of them would be lost
    if twice:
        raise Unreadable(f"{name} holds two members named {_listed(twice)}")
    try:
        damaged = archive.testzip()
    except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise Unreadable(f"{name} has a member that cannot be read: {exc}") from exc
    if damaged is not None:
        raise Unreadable(f"{name}: its member {damaged} is damaged (bad checksum)")


def _check_member_headers(archive: zipfile.ZipFile, name: str) -> None:
    """Every array member of an ``.npz`` is safe to load: the other members travel into the item's parts and
    outputs (split by row where they have one per image), so a pickle would be handed on to whoever reads
    them, and a header that claims more data than the member holds would be allocated in full when the item
    is split. Members that are no arrays travel as they are.

    Raises:
        UnsafeItem: an object (pickled) member.
        Unreadable: a member whose header claims more bytes than it holds.
    """
    for info in archive.infolist():
        label = f"{name}[{info.filename.removesuffix('.npy')}]"
        with archive.open(info) as member:
            try:
                shape, dtype = npy_header(member, label)
            except Unreadable:
                continue
            held = info.file_size - member.tell()
        if dtype.hasobject:
            raise UnsafeItem(f"{label} holds Python objects (pickles); aemon never unpickles nor passes them "
                             "on: save numeric arrays")
        claimed = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
        if claimed > held:
            raise Unreadable(f"{label} is damaged: its header gives the shape {shape} of {dtype}, {claimed} bytes, "
                             f"but it holds {held}")


def _listed(names: list[str], most: int = 10) -> str:
    """``names`` joined for a message, at most ``most`` of them (an archive may hold 100,000)."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, … ({len(names)} in all)"


def _pick_npz_key(keys: list[str], name: str, key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise BadShape(f"{name} has no array named {key!r}; it holds {_listed(keys) or 'nothing'}")
        return key
    if not keys:
        raise EmptyItem(f"{name} holds no arrays")
    if len(keys) == 1:
        return keys[0]
    for preferred in ("x", "images"):
        if preferred in keys:
            return preferred
    raise BadShape(f"{name} holds several arrays ({_listed(keys)}); keep one, or name the images 'x' or "
                   "'images' (a SRC may also pick one: FILE.npz?key=NAME)")


def read_array(path: Path, limits: Limits = Limits(), key: str | None = None) -> tuple[np.ndarray, str | None]:
    """Read a ``.npy`` or ``.npz`` file safely, exactly as stored (no scaling).

    Headers are checked before any data is read: object arrays (pickles) are refused and
    oversized arrays never reach memory.

    Returns:
        The array and, for ``.npz``, the name of the array used.
    """
    with open_file(path, limits) as fp:
        return _array_of(fp, path.name, limits, key)


def _array_of(fp: BinaryIO, name: str, limits: Limits, key: str | None = None) -> tuple[np.ndarray, str | None]:
    """The array in the open ``.npy`` or ``.npz`` file ``fp`` (its kind from ``name``; see :func:`read_array`)."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".npy":
            shape, dtype = npy_header(fp, name)
            _check_header(shape, dtype, name, limits)
            fp.seek(0)
            return np.load(fp, allow_pickle=False), None
        if suffix == ".npz":
            try:
                archive = zipfile.ZipFile(fp)
            except zipfile.BadZipFile as exc:
                raise Unreadable(f"{name} is not a valid .npz archive") from exc
            with archive:
                members = {n.removesuffix(".npy"): n for n in archive.namelist()}
                chosen = _pick_npz_key(sorted(members), name, key)
                info = archive.getinfo(members[chosen])
                unpacked = sum(member.file_size for member in archive.infolist())  # the others travel along
                if unpacked > limits.max_bytes:
                    raise TooLarge(f"{name} unpacks to {unpacked} bytes; the limit is {limits.max_bytes}")
                _check_members(archive, name)
                _check_member_headers(archive, name)
                with archive.open(info) as member:
                    shape, dtype = npy_header(member, f"{name}[{chosen}]")
                    _check_header(shape, dtype, f"{name}[{chosen}]", limits)
                with archive.open(info) as member:
                    return np.lib.format.read_array(member, allow_pickle=False), chosen
    except (UnsafeItem, TooLarge, BadShape, EmptyItem, Unreadable):
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UnsafeItem(f"{name} needs pickles to load; aemon never unpickles") from exc
        raise Unreadable(f"{name} could not be read as an array: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise Unreadable(f"{name} could not be read as an array: {exc}") from exc
    raise UnsupportedType(f"{name} is not a .npy or .npz file")


def array_to_input(raw: np.ndarray, prep: Preprocessing = Preprocessing(), name: str = "array") -> np.ndarray:
    """Convert a raw array of images into float32 model input ``(N, H, W, C)`` in [0, 1].

    Raises:
        BadShape: the shape is not one the bundle takes (see the module docstring).
        EmptyItem: the array has no rows.
        Unreadable: the values are not pixels (negative, above 255, NaN, non-numeric).
    """
    height, width = prep.size
    shape = raw.shape
    if raw.ndim >= 1 and shape[0] == 0:
        raise EmptyItem(f"{name} has 0 rows")
    if raw.dtype.kind not in "uif":  # first: a structured dtype's shape says nothing of its images
        raise Unreadable(f"{name} has dtype {raw.dtype}; expected uint8 pixels or floats in [0, 1]")
    if prep.channels == 3:
        if not (raw.ndim == 4 and shape[1:] == (height, width, 3)):
            raise BadShape(f"{name} has shape {shape}; this rgb bundle expects (N, {height}, {width}, 3)")
    elif raw.ndim == 2 and shape[1] == height * width:
        raw = raw.reshape(shape[0], height, width, 1)
    elif raw.ndim == 3 and shape[1:] == (height, width):
        raw = raw[..., None]
    elif not (raw.ndim == 4 and shape[1:] == (height, width, 1)):
        raise BadShape(
            f"{name} has shape {shape}; expected (N, {height}, {width}), (N, {height * width}) "
            f"or (N, {height}, {width}, 1)"
        )
    return unit_pixels(raw, name)


def unit_pixels(raw: np.ndarray, name: str) -> np.ndarray:
    """Pixel values as float32 in [0, 1], by the one rule for arrays and float images: ``uint16`` is
    16-bit (divided by 65535, as a 16-bit PNG is), other integers (0–255) and floats above 1 (up to 255)
    are divided by 255, floats in [0, 1] kept (and floats at most :data:`UNIT_SLACK` above 1 or below 0, a
    rounding error, clipped to 1 or 0).

    Raises:
        Unreadable: NaN or infinite values, or values outside 0–255 (other than in ``uint16``).
    """
    if raw.dtype == np.uint8:  # the common case, always in range: one pass
        return np.divide(raw, np.float32(255.0), dtype=np.float32)
    if _is_16_bit(raw.dtype):  # always in range too
        return np.divide(raw, np.float32(65535.0), dtype=np.float32)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise Unreadable(f"{name} contains NaN or infinite values")
    low, high = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    if low < (-UNIT_SLACK if raw.dtype.kind == "f" else 0) or high > 255:
        raise Unreadable(f"{name} has values in [{low:g}, {high:g}]; expected 0–255 (uint16: 0–65535) or [0, 1]")
    pixels = raw.astype(np.float32)
    scale = _full_scale(raw.dtype, high)
    if scale != 1.0:
        pixels /= scale
    elif high > 1.0:  # a rounding error above 1
        np.minimum(pixels, 1.0, out=pixels)
    if low < 0:  # a rounding error below 0
        np.maximum(pixels, 0.0, out=pixels)
    return pixels


#: Floats up to 1 + this are [0, 1] pixels with a rounding error (half a step of 8 bits), not 0–255 values;
#: floats down to minus this are such pixels too (a float filter's result a little below black).
UNIT_SLACK = 1 / 510


def _full_scale(dtype: np.dtype, high: float) -> float:
    """The value of white in pixels of ``dtype`` whose largest value is ``high``: 65535 for ``uint16``, 255
    for other integers and floats above 1 (+ :data:`UNIT_SLACK`), else 1."""
    if _is_16_bit(dtype):
        return 65535.0
    return 255.0 if dtype.kind in "ui" or high > 1.0 + UNIT_SLACK else 1.0


def _is_16_bit(dtype: np.dtype) -> bool:
    """``uint16`` in either byte order (``>u2`` is not ``== np.uint16``: an array saved on a big-endian machine)."""
    return dtype.kind == "u" and dtype.itemsize == 2


def input_to_array(pixels: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Model-space pixels ``(N, H, W, C)`` in [0, 1] back to the shape, scale and dtype of ``like``.

    The inverse of :func:`array_to_input`: ``uint16`` arrays get 0–65535 values, other integer arrays and
    floats above 1 0–255 values (rounded for integers), floats in [0, 1] keep that range.
    """
    out = np.clip(pixels.astype(np.float64), 0.0, 1.0)
    scale = _full_scale(like.dtype, float(like.max()) if like.size else 0.0)
    if scale != 1.0:
        out = out * scale
    if like.dtype.kind in "ui":  # rounded, and clipped to what the dtype holds (an int8's 128 wrapped to -128)
        info = np.iinfo(like.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.reshape(like.shape).astype(like.dtype)


@dataclass
class Decoded:
    """One decoded file: model input, and for an array file the array exactly as stored."""

    #: Model input ``(N, H, W, C)`` float32 in [0, 1]; N is 1 for an image.
    x: np.ndarray
    #: The array as stored (arrays only), for writing parts of it back with its own dtype.
    raw: np.ndarray | None = None
    #: The ``.npz`` member used (``.npz`` only).
    key: str | None = None
    #: An ``.npz`` file, still open: its other members are copied into the parts from this very file.
    source: BinaryIO | None = None
    #: How an image file looks (images only).
    look: Look | None = None


def decode(path: Path, prep: Preprocessing = Preprocessing(), limits: Limits = Limits(),
           label: str | None = None) -> Decoded:
    """Decode an image or array file, choosing the decoder by suffix (the only place that does).

    The file is opened once (:func:`open_file`); an ``.npz`` stays open in ``Decoded.source``
    (the caller closes it).

    Args:
        path: The file.
        prep: The bundle's preprocessing.
        limits: Size limits.
        label: The name used in error messages (default: the file name).

    Raises:
        ItemRejected: a subclass naming why the file cannot be used (``UnsupportedType`` for
            other suffixes).
    """
    name = label or path.name
    if not (is_image_name(path.name) or is_array_name(path.name)):
        raise UnsupportedType(f"{name}: unsupported file type; expected an image "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))}) or an array (.npy, .npz)")
    fp: BinaryIO | None = open_file(path, limits)
    try:
        if is_image_name(path.name):
            pixels, look = _image_pixels(fp, path.name, prep, limits)
            return Decoded(pixels[None], look=look)
        raw, key = _array_of(fp, path.name, limits)
        decoded = Decoded(array_to_input(raw, prep, f"{name}[{key}]" if key else name), raw, key)
        if key is not None:
            decoded.source, fp = fp, None  # kept open: the parts copy its other members
        return decoded
    finally:
        if fp is not None:
            fp.close()


def decode_file(path: Path, prep: Preprocessing = Preprocessing(), limits: Limits = Limits()) -> np.ndarray:
    """Model input ``(N, H, W, C)`` of an image or array file (see :func:`decode`)."""
    decoded = decode(path, prep, limits)
    if decoded.source is not None:
        decoded.source.close()
    return decoded.x
