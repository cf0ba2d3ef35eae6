"""Cheap checks of an image file's structure, before Pillow parses it.

Pillow reads each metadata part, strip or tile of a file in Python: a few kilobytes of crafted structure
(24 million empty JPEG segments, 9 million one-row TIFF strips, 20 million GIF comments) hold a process
for minutes and take gigabytes, although the pixels are few. Each format's parts are counted here from
the raw bytes, without decoding, and a file with far more of them than any camera or scanner writes is
refused as unreadable.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from aemon.errors import Unreadable

__all__ = ["MAX_METADATA_PARTS", "MAX_SCAN_PIXELS", "MAX_TIFF_PIECES", "MAX_GIF_SUB_BLOCKS", "check_structure"]

#: Segments of a JPEG before its image data, chunks of a PNG other than image data: a camera's file has a
#: few dozen. Pillow reads each in Python: 24 million empty APP5 segments took over a minute and 3 GB.
MAX_METADATA_PARTS = 1_000
#: Scans of a progressive JPEG times its pixels: each scan passes over the whole image again (about 7 ms
#: per million pixels here), so 30,000 scans of a small image held the daemon for minutes. A camera's
#: progressive JPEG has about 10 scans; this allows 25 at the 40-megapixel limit, 1,000 at one megapixel.
MAX_SCAN_PIXELS = 1_000_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG chunks of an animation's later frames (a control chunk and the data of each), after the image data:
#: never parsed, since only the first frame is decoded; the size of the file bounds how many there are.
_PNG_FRAME_CHUNKS = (b"fcTL", b"fdAT")
#: The part of a JPEG read in one piece for its structure (the whole file, for any camera's).
_JPEG_HEAD = 1 << 24


def check_structure(fp: BinaryIO, name: str) -> None:
    """Refuse an image whose structure would cost far more to decode than its pixels: too many metadata
    parts (JPEG segments, PNG chunks, TIFF tags, GIF extension blocks), progressive scans, or TIFF strips
    and tiles. Read before Pillow parses the header; ``fp`` is left at 0.

    Raises:
        Unreadable: naming what is excessive.
    """
    head = fp.read(8)
    try:
        if head.startswith(b"\xff\xd8"):
            _check_jpeg(fp, name)
        elif head == _PNG_SIGNATURE:
            _check_png(fp, name)
        elif head[:4] in _TIFF_MAGIC:
            _check_tiff(fp, head, name)
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            _check_gif(fp, name)
    finally:
        fp.seek(0)


def _check_jpeg(fp: BinaryIO, name: str) -> None:
    fp.seek(0)
    data = fp.read(min(_JPEG_HEAD, os.fstat(fp.fileno()).st_size))  # the whole file, for any camera's
    at, parts, width, height, progressive = 2, 0, 0, 0, False
    while True:  # the segments before the first scan, each FF xx and a length
        while data[at : at + 2] == b"\xff\xff":  # fill bytes
            at += 1
        if at + 4 > len(data) or data[at] != 0xFF or data[at + 1] == 0xD9:
            return  # malformed, cut, or no image data: Pillow says what is wrong
        marker, size = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA:
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header: the size
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
        parts += 1
        if parts > MAX_METADATA_PARTS:
            raise Unreadable(f"{name} has more than {MAX_METADATA_PARTS} JPEG segments before its image data "
                             "(a camera's has a few dozen); re-save it")
        at += 2 + size
    if not progressive:
        return  # a sequential JPEG reads each component's scan once
    scans = data.count(b"\xff\xda", at)  # a scan header is FF DA, which coded data never holds
    carry = data[-1:]
    while len(data) == _JPEG_HEAD and (chunk := fp.read(_JPEG_HEAD)):  # a file larger than that
        scans += (carry + chunk).count(b"\xff\xda")
        carry = chunk[-1:]
    most = max(1, MAX_SCAN_PIXELS // max(1, width * height))
    if scans > most:
        raise Unreadable(f"{name} is a progressive JPEG of {scans} scans at {width}x{height} pixels; each scan "
                         f"passes over the whole image, and at this size at most {most} are decoded (a camera's "
                         "has about 10); re-save it")


def _check_png(fp: BinaryIO, name: str) -> None:
    size = os.fstat(fp.fileno()).st_size
    most_chunks = 10_000 + size // 512  # image data comes in chunks of 8 KiB or more from any encoder
    others = chunks = 0
    pixels = False  # the image data began
    while header := fp.read(8):
        if len(header) < 8:
            return
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        chunks += 1
        pixels = pixels or kind == b"IDAT"
        others += kind != b"IDAT" and not (pixels and kind in _PNG_FRAME_CHUNKS)
        if others > MAX_METADATA_PARTS:
            raise Unreadable(f"{name} has more than {MAX_METADATA_PARTS} PNG chunks besides its image data and "
                             "animation frames (a camera's has a few); re-save it")
        if chunks > most_chunks:
            raise Unreadable(f"{name} has more than {most_chunks} PNG chunks for its {size} bytes; re-save it")
        if kind == b"IEND":
            return
        fp.seek(length + 4, os.SEEK_CUR)


#: TIFF byte orders and versions: classic (4-byte offsets) and BigTIFF (8-byte offsets).
_TIFF_MAGIC = {b"II*\x00": ("little", False), b"MM\x00*": ("big", False), b"II+\x00": ("little", True),
               b"MM\x00+": ("big", True)}
#: Strips and tiles of a TIFF's first image: a scanner's file with one row per strip has one per row (a few
#: thousand); Pillow spends about 5 µs and hundreds of bytes on each, so 4 million took 19 s and 1.5 GB.
MAX_TIFF_PIECES = 65_536
_TIFF_OFFSET_TAGS = (273, 324)  # StripOffsets, TileOffsets


def _check_tiff(fp: BinaryIO, head: bytes, name: str) -> None:
    order, big = _TIFF_MAGIC[head[:4]]
    fp.seek(8 if big else 4)
    offset = int.from_bytes(fp.read(8 if big else 4), order)
    fp.seek(offset)
    count_size, entry_size = (8, 20) if big else (2, 12)
    raw = fp.read(count_size)
    if len(raw) < count_size:
        return  # cut: Pillow says what is wrong
    entries = int.from_bytes(raw, order)
    if entries > MAX_METADATA_PARTS:
        raise Unreadable(f"{name} has {entries} TIFF tags in its first image (a camera's or scanner's has a few "
                         f"dozen; at most {MAX_METADATA_PARTS} are read); re-save it")
    table = fp.read(entries * entry_size)
    for at in range(0, len(table) - entry_size + 1, entry_size):
        tag = int.from_bytes(table[at : at + 2], order)
        if tag in _TIFF_OFFSET_TAGS:
            pieces = int.from_bytes(table[at + 4 : at + (12 if big else 8)], order)
            if pieces > MAX_TIFF_PIECES:
                raise Unreadable(f"{name} is a TIFF of {pieces} strips or tiles (a scanner's has at most a few "
                                 f"thousand; at most {MAX_TIFF_PIECES} are decoded); re-save it")


#: Data sub-blocks (up to 255 bytes each) of a GIF's extensions before its first frame: 16 MB of metadata.
#: Pillow joins them in Python; a comment of 20 million blocks took 17 s and 3.4 GB.
MAX_GIF_SUB_BLOCKS = 65_536


def _check_gif(fp: BinaryIO, name: str) -> None:
    fp.seek(10)
    packed = fp.read(1)
    if not packed:
        return
    fp.seek(13 + (3 << ((packed[0] & 7) + 1) if packed[0] & 0x80 else 0))  # after the global colour table
    extensions = blocks = 0
    while fp.read(1) == b"!":  # an extension: a label, then sub-blocks until an empty one
        extensions += 1
        if extensions > MAX_METADATA_PARTS:
            raise Unreadable(f"{name} has more than {MAX_METADATA_PARTS} GIF extension blocks before its first "
                             "frame (a camera's or editor's has a few); re-save it")
        fp.seek(1, os.SEEK_CUR)
        while (size := fp.read(1)) and size[0]:
            blocks += 1
            if blocks > MAX_GIF_SUB_BLOCKS:
                raise Unreadable(f"{name} has more than {MAX_GIF_SUB_BLOCKS} blocks of metadata before its first "
                                 "frame (16 MB); re-save it")
            fp.seek(size[0], os.SEEK_CUR)
