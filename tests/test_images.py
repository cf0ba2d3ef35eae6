"""Decoding of single image and array files (aemon.images)."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from daemon_process import png_chunk
from PIL import Image

from aemon.errors import BadShape, EmptyItem, TooLarge, Unreadable, UnsafeItem, UnsupportedType
from aemon.images import Limits, Preprocessing, array_to_input, decode_file, decode_image, read_array


def _png_header(path: Path, width: int, height: int) -> None:
    """Write a PNG whose header claims width×height but whose pixel data is a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff", ".webp", ".gif"])
def test_decode_image_formats(tmp_path: Path, suffix: str) -> None:
    """Every supported image format decodes to a (28, 28, 1) float32 array in [0, 1]."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[10:18, 10:18] = 255
    path = tmp_path / f"digit{suffix}"
    Image.fromarray(pixels).save(path)
    x = decode_image(path)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[14, 14, 0] > 0.9 and x[0, 0, 0] < 0.1


def test_decode_image_converts_colour_and_resizes(tmp_path: Path) -> None:
    """An RGBA image of another size becomes grayscale at the bundle's size, composited onto black."""
    path = tmp_path / "big.png"
    Image.new("RGBA", (56, 40), (255, 255, 255, 128)).save(path)
    x = decode_image(path)
    assert x.shape == (28, 28, 1)
    assert np.allclose(x, 128 / 255, atol=1 / 255)


def test_decode_file_image_has_batch_axis(tmp_path: Path) -> None:
    """decode_file returns an image as a batch of one."""
    path = tmp_path / "a.png"
    Image.new("L", (28, 28), 0).save(path)
    assert decode_file(path).shape == (1, 28, 28, 1)


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    """A zero-byte image is refused as empty."""
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(EmptyItem, match="0 bytes"):
        decode_image(path)


def test_corrupt_image_is_unreadable(tmp_path: Path) -> None:
    """Bytes that are not an image are refused as unreadable."""
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(Unreadable):
        decode_image(path)


def test_huge_png_header_is_refused_without_decoding(tmp_path: Path) -> None:
    """A PNG header claiming 100,000×100,000 pixels is refused as too large before decoding."""
    path = tmp_path / "bomb.png"
    _png_header(path, 100_000, 100_000)
    assert path.stat().st_size < 200
    with pytest.raises(TooLarge, match="pixels"):
        decode_image(path)


def test_the_pixel_limit_is_aemons_own_above_and_below_pillows(tmp_path: Path) -> None:
    """The refusal names the configured limit, and a limit raised past Pillow's own bomb limit (89 Mpx) works:
    a 20000x20000 header was refused quoting Pillow's 178956970, and AEMON_MAX_IMAGE_PIXELS above it did nothing."""
    path = tmp_path / "wide.png"
    _png_header(path, 20_000, 20_000)
    with pytest.raises(TooLarge, match="20000x20000 pixels; the limit is 40000000 pixels"):
        decode_image(path)
    big = tmp_path / "big.png"
    Image.new("L", (9_500, 9_500), 0).save(big)  # 90 Mpx: past Pillow's warning limit
    assert decode_image(big, limits=Limits(max_pixels=100_000_000)).shape == (28, 28, 1)


def test_only_the_contracts_formats_are_decoded(tmp_path: Path) -> None:
    """PNG, JPEG, BMP, TIFF, WebP and GIF only, whatever the name: an icon or a PostScript file named .png must
    never reach another Pillow plugin (EPS would run Ghostscript on untrusted input)."""
    Image.new("L", (28, 28), 0).save(tmp_path / "icon.ico")
    (tmp_path / "icon.ico").rename(tmp_path / "icon.png")
    (tmp_path / "page.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    for name in ("icon.png", "page.png"):
        with pytest.raises(Unreadable, match="not a PNG, JPEG, BMP, TIFF, WebP or GIF image"):
            decode_image(tmp_path / name)
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"):
        Image.new("L", (28, 28), 0).save(tmp_path / "x.img", format=fmt)
        assert decode_image(tmp_path / "x.img").shape == (28, 28, 1), fmt


def _tagged(path: Path, upright: np.ndarray, orientation: int) -> Path:
    """``upright`` stored as a camera would with an EXIF orientation tag (6: turn 90° clockwise to view,
    8: 90° anticlockwise, 3: 180°)."""
    stored = np.rot90(upright, {6: 1, 8: -1, 3: 2}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_an_exif_orientation_is_applied_as_a_viewer_would(tmp_path: Path, orientation: int) -> None:
    """A phone photo stores its pixels turned and says so in EXIF: it is scored (and mapped, and denoised)
    as displayed, like the same picture saved upright; it was scored as stored."""
    upright = np.zeros((40, 30), np.uint8)
    upright[5:12, 3:25] = 255  # a bar near the top: wrong anywhere else
    Image.fromarray(upright).save(tmp_path / "upright.png")
    tagged = _tagged(tmp_path / "tagged.png", upright, orientation)
    prep = Preprocessing(size=(40, 30))
    np.testing.assert_array_equal(decode_image(tagged, prep), decode_image(tmp_path / "upright.png", prep))


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb"])
def test_what_hides_under_transparent_pixels_does_not_count(tmp_path: Path, color_mode: str) -> None:
    """Fully transparent pixels show the viewer's background whatever colour they store: two files that look
    the same decode the same (transparent parts as black), in LA, RGBA, palette and 16-bit grey images with a
    transparent value; the hidden colour decided the verdict."""
    visible = np.zeros((28, 28), np.uint8)
    visible[8:20, 12:16] = 200
    alpha = np.where(visible > 0, 255, 0).astype(np.uint8)
    prep = Preprocessing(color_mode=color_mode)
    decoded = []
    for hidden in (0, 255):
        grey = np.where(alpha > 0, visible, hidden).astype(np.uint8)
        Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / f"la{hidden}.png")
        Image.fromarray(np.stack([grey, grey, grey, alpha], -1), "RGBA").save(tmp_path / f"rgba{hidden}.png")
        palette = Image.fromarray(np.stack([grey] * 3, -1), "RGB").quantize(4)
        index = np.asarray(palette)
        transparent = int(index[0, 0])
        palette.save(tmp_path / f"p{hidden}.png", transparency=transparent)
        # 16-bit grey with a transparent value (tRNS): the stored value is the key itself.
        Image.fromarray(np.where(alpha > 0, visible.astype(np.uint16) * 257, hidden * 257).astype(np.uint16)).save(
            tmp_path / f"g16{hidden}.png", transparency=hidden * 257)
        decoded += [decode_image(tmp_path / f"{kind}{hidden}.png", prep) for kind in ("la", "rgba", "p", "g16")]
    for x in decoded[1:]:
        np.testing.assert_allclose(x, decoded[0], atol=1 / 255)


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    """An ordinary image above a configured pixel limit is refused as too large."""
    path = tmp_path / "a.png"
    Image.new("L", (100, 100), 0).save(path)
    with pytest.raises(TooLarge):
        decode_image(path, limits=Limits(max_pixels=5_000))


def test_byte_limit(tmp_path: Path) -> None:
    """A file above the byte limit is refused as too large."""
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(TooLarge):
        read_array(path, Limits(max_bytes=100))


def test_npz_limit_counts_every_array_it_holds(tmp_path: Path) -> None:
    """The other arrays of an .npz travel with its parts, so a small image array beside a member that
    unpacks past the limit (a zip bomb) is refused before anything is unpacked."""
    import zipfile

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 28, 28), np.uint8))
        archive.writestr("x.npy", buf.getvalue())
        archive.writestr("junk.npy", bytes(5_000_000))
    assert path.stat().st_size < 100_000
    assert read_array(path, Limits(max_bytes=10_000_000))[1] == "x"
    with pytest.raises(TooLarge, match=r"bomb\.npz unpacks to 5001"):
        read_array(path, Limits(max_bytes=1_000_000))


def test_unsupported_suffix(tmp_path: Path) -> None:
    """A file that is neither an image nor an array is an unsupported type."""
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnsupportedType):
        decode_file(path)


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 784), (3, 28, 28, 1)])
def test_array_shapes(shape: tuple[int, ...]) -> None:
    """Each accepted array shape becomes (N, 28, 28, 1)."""
    raw = np.full(shape, 255, np.uint8)
    x = array_to_input(raw)
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.float32
    assert np.allclose(x, 1.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (np.full((2, 28, 28), 51, np.uint8), 0.2),
        (np.full((2, 28, 28), 0.2, np.float32), 0.2),
        (np.full((2, 28, 28), 51.0, np.float64), 0.2),
    ],
    ids=["uint8", "float01", "float255"],
)
def test_array_scaling(raw: np.ndarray, expected: float) -> None:
    """uint8 and float 0–255 are divided by 255; float [0, 1] is kept."""
    assert np.allclose(array_to_input(raw), expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 27, 28), (3, 28), (3, 28, 28, 3), (784,)])
def test_array_wrong_shape(shape: tuple[int, ...]) -> None:
    """Shapes other than the accepted three are refused as bad_shape."""
    with pytest.raises(BadShape, match="expected"):
        array_to_input(np.zeros(shape, np.uint8))


def test_array_nan_refused() -> None:
    """NaN values are refused as unreadable."""
    raw = np.zeros((2, 28, 28), np.float32)
    raw[0, 0, 0] = np.nan
    with pytest.raises(Unreadable, match="NaN"):
        array_to_input(raw)


@pytest.mark.parametrize("value", [-1.0, 300.0])
def test_array_out_of_range_refused(value: float) -> None:
    """Negative values or values above 255 are refused."""
    with pytest.raises(Unreadable):
        array_to_input(np.full((1, 28, 28), value, np.float32))


def test_floats_a_rounding_error_outside_zero_to_one_are_clipped_alike() -> None:
    """[0, 1] floats one rounding step above 1 were clipped, one step below 0 (-1e-7, a float filter's result)
    refused the whole array as unreadable. Both sides are now clipped; a real negative value is still refused."""
    raw = np.full((2, 28, 28), 0.5, np.float32)
    raw[0, 0, 0], raw[1, 0, 0] = -1e-7, 1 + 1e-7
    x = array_to_input(raw)
    assert x[0, 0, 0, 0] == 0.0 and x[1, 0, 0, 0] == 1.0 and np.allclose(x[0, 1:], 0.5)
    raw[0, 0, 0] = -0.01
    with pytest.raises(Unreadable, match="values in"):
        array_to_input(raw)
    with pytest.raises(Unreadable, match="values in"):
        array_to_input(np.full((1, 28, 28), -1, np.int8))


def test_array_zero_rows_empty() -> None:
    """An array with no rows is refused as empty."""
    with pytest.raises(EmptyItem):
        array_to_input(np.zeros((0, 28, 28), np.uint8))


def test_object_npy_refused_without_unpickling(tmp_path: Path) -> None:
    """An object (pickled) .npy is refused as unsafe."""
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeItem, match="pickle"):
        read_array(path)


def test_npz_key_selection(tmp_path: Path) -> None:
    """An .npz with several arrays uses the named key, and an unknown key is refused."""
    path = tmp_path / "data.npz"
    np.savez(path, a=np.zeros((2, 28, 28), np.uint8), b=np.ones((3, 28, 28), np.uint8))
    raw, key = read_array(path, key="b")
    assert key == "b" and raw.shape == (3, 28, 28)
    with pytest.raises(BadShape, match="several arrays"):
        read_array(path)
    with pytest.raises(BadShape, match="no array named"):
        read_array(path, key="c")


def test_preprocessing_round_trip() -> None:
    """Preprocessing survives its bundle.json form."""
    prep = Preprocessing(size=(32, 20))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert prep.input_shape == (32, 20, 1)


def test_auto_colour_looks_across_the_whole_folder(tmp_path: Path) -> None:
    """--color auto inspects files spread over the folder, not its first 500 in name order: a folder
    whose colour images sort last is still found colourful."""
    from aemon.sources import choose_input

    folder = tmp_path / "mixed"
    folder.mkdir()
    grey = np.full((8, 8), 90, np.uint8)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    for i in range(600):
        Image.fromarray(grey).save(folder / f"a{i:04d}.png")
    for i in range(60):
        Image.fromarray(colour).save(folder / f"b{i:04d}.png")
    prep, choices = choose_input(str(folder))
    assert prep.color_mode == "rgb", choices


def test_a_32_bit_image_outside_16_bit_values_is_refused(tmp_path: Path) -> None:
    """A 32-bit integer image (mode I) is read as 16-bit values; others are refused, not clipped."""
    ok = tmp_path / "ok.tif"
    Image.fromarray(np.full((8, 8), 65535, np.int32)).save(ok)
    with Image.open(ok) as img:
        assert img.mode == "I"
    assert decode_image(ok, Preprocessing(size=(8, 8))).max() == pytest.approx(1.0)
    for name, value in (("big.tif", 100_000), ("negative.tif", -5)):
        Image.fromarray(np.full((8, 8), value, np.int32)).save(tmp_path / name)
        with pytest.raises(Unreadable, match=name):
            decode_image(tmp_path / name, Preprocessing(size=(8, 8)))


def test_a_lab_tiff_decodes_for_grey_and_colour_bundles(tmp_path):
    """A LAB TIFF scored with a colour bundle but was rejected as unreadable by a grey one."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    path = tmp_path / "lab.tif"
    rgb.convert("LAB").save(path)
    grey = decode_image(path, Preprocessing(color_mode="grayscale"))
    colour = decode_image(path, Preprocessing(color_mode="rgb"))
    assert grey.shape == (28, 28, 1) and colour.shape == (28, 28, 3)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32)[..., None] / 255.0
    np.testing.assert_allclose(grey, expected)


def test_a_tiff_turned_a_quarter_by_exif_is_refused_not_misread(tmp_path: Path) -> None:
    """Pillow turns quarter-turn TIFFs itself, inconsistently; applied again they were scored turned and denoised
    at the wrong size. They are refused, saying how to fix them; half turns and mirrors decode as displayed."""
    upright = np.zeros((28, 56), np.uint8)
    upright[3:8, 5:40] = 255
    for orientation, stored in ((6, np.rot90(upright, 1)), (3, np.rot90(upright, 2))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / f"o{orientation}.tif", exif=exif)
    with pytest.raises(UnsupportedType, match="save it upright"):
        decode_image(tmp_path / "o6.tif")
    Image.fromarray(upright).save(tmp_path / "upright.tif")
    prep = Preprocessing(size=(28, 56))
    np.testing.assert_array_equal(decode_image(tmp_path / "o3.tif", prep), decode_image(tmp_path / "upright.tif", prep))


def test_an_npz_with_two_members_of_one_name_is_unreadable(tmp_path: Path) -> None:
    """'x' beside 'x.npy' (or 'x.npy' twice): one of them was silently dropped from the parts."""
    import zipfile

    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 28, 28), np.uint8))
    path = tmp_path / "twice.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", buf.getvalue())
        archive.writestr("x", b"a note named like the images")
    with pytest.raises(Unreadable, match="two members named x"):
        read_array(path)


def test_a_cameras_progressive_jpeg_and_metadata_pass_the_structure_check(tmp_path):
    """The structure check refuses only the excessive: a 2048x2048 colour progressive JPEG (Pillow's 10 scans)
    with EXIF and a comment, and a PNG with text chunks, decode; the same JPEG's scan repeated to pass the
    budget for its size, and a PNG with 1,001 text chunks, are refused naming why."""
    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "a camera's description"
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True, exif=exif, comment=b"line 4")
    good = tmp_path / "progressive.jpg"
    good.write_bytes(buf.getvalue())
    assert decode_image(good, Preprocessing(size=(64, 64), color_mode="rgb")).shape == (64, 64, 3)
    data = buf.getvalue()
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    most = 1_000_000_000 // (2048 * 2048)
    bad = tmp_path / "rescanned.jpg"
    bad.write_bytes(data[:end] + data[last:end] * (most - 9) + data[end:])
    with pytest.raises(Unreadable, match=f"progressive JPEG of {most + 1} scans at 2048x2048"):
        decode_image(bad, Preprocessing(size=(64, 64), color_mode="rgb"))

    from PIL import PngImagePlugin

    def png_with_texts(n: int) -> bytes:
        info = PngImagePlugin.PngInfo()
        for i in range(n):
            info.add_text(f"k{i}", "v")
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(out, "PNG", pnginfo=info)
        return out.getvalue()

    (tmp_path / "texts.png").write_bytes(png_with_texts(50))
    assert decode_image(tmp_path / "texts.png").shape == (28, 28, 1)
    (tmp_path / "many.png").write_bytes(png_with_texts(1_001))
    with pytest.raises(Unreadable, match="more than 1000 PNG chunks besides its image data"):
        decode_image(tmp_path / "many.png")


@pytest.mark.parametrize(("shape", "scale"), [((28, 28, 3), 5), ((3, 7, 3), 43), ((300, 200, 3), 1)])
def test_an_enlarged_map_png_decodes_to_its_pixels_each_drawn_scale_times(shape, scale):
    """Maps are PNGs written without Pillow (repeated rows stored with the "up" filter): any decoder must read
    back exactly the pixels, each drawn ``scale`` times in both directions."""
    from aemon.maps import enlarged_png

    pixels = np.random.default_rng(scale).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(enlarged_png(pixels, scale))) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        got = np.asarray(img)
    assert np.array_equal(got, pixels.repeat(scale, axis=0).repeat(scale, axis=1))


def test_reconstructions_go_back_to_a_signed_array_clipped_to_its_dtype() -> None:
    """A denoised int8 array (0-127 accepted as 0-255 pixels): reconstructions above 127 wrapped to negative
    values (128 came back as -128; an attack, 746 of 24,576 values). They are clipped to what int8 holds."""
    from aemon.images import input_to_array

    like = np.full((2, 4, 4), 120, np.int8)
    back = input_to_array(np.linspace(0.0, 1.0, 32, dtype=np.float32).reshape(2, 4, 4, 1), like)
    assert back.dtype == np.int8 and back.shape == like.shape
    assert back.min() >= 0 and back.max() == 127


def test_a_uint16_array_is_16_bit_both_ways() -> None:
    """A uint16 array is read as 16-bit (0-65535 to [0, 1]) and a reconstruction goes back to 16-bit values;
    values above 255 in other integer types are still refused."""
    from aemon.images import input_to_array

    like = (np.arange(2 * 28 * 28) % 256).astype(np.uint16).reshape(2, 28, 28) * 257
    x = array_to_input(like)
    assert x.dtype == np.float32 and x.max() == 1.0
    assert np.allclose(x[..., 0] * 65535.0, like)
    back = input_to_array(x, like)
    assert back.dtype == np.uint16 and np.array_equal(back, like)
    with pytest.raises(Unreadable, match=r"values in \[300, 300\]"):
        array_to_input(np.full((1, 28, 28), 300, np.int32))


def test_a_structured_array_is_refused_for_its_dtype_not_its_shape() -> None:
    """An array of records holding (28, 28) images was refused as bad_shape "has shape (5,)", which says
    nothing of what is wrong: it is refused for its dtype."""
    records = np.zeros(5, dtype=[("a", "u1", (28, 28)), ("b", "f4")])
    with pytest.raises(Unreadable, match=r"has dtype .*expected uint8 pixels or floats"):
        array_to_input(records)


def test_an_npy_header_over_numpys_limit_is_refused_without_numpys_advice() -> None:
    """A .npy whose header is over numpy's 10,000-byte limit (a shape 5,000 deep) was refused with numpy's
    advice, "adjust max_header_size or fully trust the .npy file using allow_pickle=True": nothing a user can
    do in the daemon, and an unsafe setting. The error says what is wrong, nothing more."""
    import io

    from aemon.images import npy_header

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "<u1", "fortran_order": False, "shape": (1,) * 5000})
    buf.seek(0)
    with pytest.raises(Unreadable) as err:
        npy_header(buf, "deep.npy")
    assert "header is longer than numpy reads" in str(err.value)
    assert "allow_pickle" not in str(err.value) and "max_header_size" not in str(err.value)


def test_a_line_of_many_pixels_decodes_within_a_small_memory_limit(tmp_path: Path) -> None:
    """A PNG of 1x40,000,000 pixels (78 KB, exactly the pixel limit) took 0.7 GB to shrink to 28x28: the
    bilinear filter's table grows with the side (a helper's attack). Such sides are reduced by whole steps
    first; it now decodes in a process limited to 600 MB of address space."""
    import subprocess
    import sys

    line = tmp_path / "line.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("L", (40_000_000, 1), 255).save(line)
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))\n"
              "from pathlib import Path\n"
              "from aemon.images import decode_image\n"
              "x = decode_image(Path(sys.argv[1]))\n"
              "print(x.shape, float(x.min()), float(x.max()))\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # a thread stack per core otherwise
    done = subprocess.run([sys.executable, "-c", script, str(line)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(28,", "28,", "1)", "1.0", "1.0"], done.stdout


def test_a_camera_frame_decodes_exactly_as_a_plain_bilinear_resize(tmp_path: Path) -> None:
    """Reducing long sides by whole steps first is only for sides no camera has: a 4000x3000 frame shrunk to
    28x28 (143 times) decodes as Pillow's plain bilinear resize, as bundles were trained (a first version
    reduced it, changing a quarter of the pixels by one step: a reviewer's catch)."""
    frame = np.random.default_rng(0).integers(0, 256, (3000, 4000), dtype=np.uint8)
    Image.fromarray(frame).save(tmp_path / "frame.png")
    expected = np.asarray(Image.fromarray(frame).resize((28, 28), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_array_equal(decode_image(tmp_path / "frame.png")[..., 0], expected)
