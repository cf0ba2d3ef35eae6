"""Data sources (``SRC``): a folder of images, an array file, ``keras:*`` or ``sample:mnist``.

Every form becomes a :class:`Dataset` of model input ``(N, H, W, 1)`` in [0, 1], decoded by
:mod:`aemon.images`, with labels where the source has them. Query options after ``?``:

* ``digits=0,1`` (``sample:mnist``, ``keras:*`` and ``.npz`` files with labels): keep those classes.
* ``split=train|test|all`` (``keras:*``; default ``train``).
* ``key=x_test`` (``.npz``): which array to read; its labels are ``y_test`` if present.
* ``limit=N``: keep the first N images.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from aemon.errors import ItemRejected, SourceError, UsageError
from aemon.images import (
    Limits,
    Preprocessing,
    array_to_input,
    decode_image,
    displayed_size,
    is_array_name,
    is_image_name,
    open_file,
    open_image,
    over_black,
    read_array,
)

__all__ = ["Dataset", "load_source", "local_path", "provenance", "is_named", "parse_source", "list_images",
           "choose_input", "unlike_input", "sample_mnist", "MAX_AUTO_SIDE", "check_output_folder",
           "make_output_folder", "refuse_output_inside", "refuse_output_in_bundles"]

#: Unreadable files of a folder named in one error, at most.
MAX_NAMED = 5
#: ``--size auto`` keeps the longer side at most this (the aspect kept, sides multiples of 4).
MAX_AUTO_SIDE = 128
#: Images whose headers ``--size auto`` and ``--color auto`` look at, at most.
_INSPECT = 500

_KERAS = ("mnist", "fashion_mnist")
#: The query options of each kind of source (see :func:`_options_of`).
_SOURCE_OPTIONS = {
    "sample:elpv": {"type", "defect", "split", "limit"},
    "sample": {"digits", "limit"},
    "keras": {"split", "digits", "limit"},
    "npz": {"key", "digits", "limit"},
    "other": {"limit"},  # a .npy (no labels), a folder or an image file
}
_OPTIONS = set().union(*_SOURCE_OPTIONS.values())
#: Share of sample:elpv in its ``split=train`` part (a fixed, seeded split of the whole set).
ELPV_TRAIN_SHARE = 0.7
_ELPV_DEFECTS = {"0": 0.0, "1/3": 1 / 3, "2/3": 2 / 3, "1": 1.0}


@dataclass
class Dataset:
    """Images read from one source."""

    #: Model input, ``(N, H, W, 1)`` float32 in [0, 1].
    x: np.ndarray
    #: Class labels when the source has them.
    labels: np.ndarray | None
    #: The source as the user wrote it (kept in bundle provenance).
    source: str

    def __len__(self) -> int:
        return len(self.x)


#: Prefixes of the named data sets; any other source is a local file or folder.
NAMED_PREFIXES = ("sample:", "keras:")


def is_named(base: str) -> bool:
    """True for a named data set (``sample:...``, ``keras:...``), False for a local path."""
    return base.startswith(NAMED_PREFIXES)


def parse_source(src: str) -> tuple[str, dict[str, str]]:
    """``src`` split into its base (a name or a path) and its query options (the last of a repeated one),
    unchecked."""
    base, values = _parse(src)
    return base, {k: v[-1] for k, v in values.items()}


def _parse(src: str) -> tuple[str, dict[str, list[str]]]:
    """``src`` split into its base and every value given to each query option."""
    base, _, query = src.partition("?")
    return base, parse_qs(query, keep_blank_values=True)


def _split_query(src: str) -> tuple[str, dict[str, str]]:
    base, values = _parse(src)
    options = {k: v[-1] for k, v in values.items()}
    if not base.strip():  # an unset variable in a script: never the current folder
        raise SourceError(f"an empty data source ({src!r}); name a folder, an image or array file, or a sample "
                          "such as sample:mnist")
    repeated = [k for k, v in values.items() if len(v) > 1]
    if repeated:
        raise SourceError(f"{src}: {', '.join(sorted(repeated))} is given twice; give each option once")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise SourceError(f"{src}: unknown option(s) {', '.join(sorted(unknown))}; {base} takes "
                          f"{', '.join(sorted(_options_of(base))) or 'no options'}")
    foreign = set(options) - _options_of(base)
    if foreign:  # e.g. digits= on sample:elpv would filter its cells by defect probability
        raise SourceError(f"{src}: {', '.join(sorted(foreign))} does not apply to this source; it takes "
                          f"{', '.join(sorted(_options_of(base)))}")
    return base, options


def _options_of(base: str) -> set[str]:
    """The query options a source takes."""
    kind = ("sample:elpv" if base == "sample:elpv" else "sample" if base.startswith("sample:") else
            "keras" if base.startswith("keras:") else "npz" if base.lower().endswith(".npz") else "other")
    return _SOURCE_OPTIONS[kind]


def provenance(src: str) -> str:
    """``src`` as a bundle stores it: a local path made absolute (it names the same data from any folder,
    so that ``evaluate`` can tell an overlap), the query kept."""
    base, sep, query = src.partition("?")
    if is_named(base):
        return src
    return os.path.abspath(base) + sep + query


def local_path(src: str) -> Path | None:
    """The file or folder that ``src`` reads (its query removed), or None for the built-in samples."""
    base, _ = _split_query(src)
    return None if is_named(base) else Path(base)


def check_output_folder(out: Path, inputs: Iterable[str | Path], flag: str, by_name: bool = False,
                        bundles: Iterable[Path] = ()) -> None:
    """An output folder (``--maps``, ``--out``, ``--report``) must be a folder, or nothing yet, outside every
    input folder and every bundle used.

    Args:
        by_name: The outputs of an input folder go to ``out/<its name>/`` (``score``, ``denoise``), which
            must not be nor overlap an input folder either.
        bundles: The bundles used: outputs inside one would change it (a shipped one too), and ``train
            --force`` would then refuse to replace it.

    Raises:
        UsageError: what is wrong with it.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a folder")
    refuse_output_in_bundles(out, bundles, flag)
    inputs = list(inputs)
    refuse_output_inside(out, inputs, flag)
    if not by_name:
        return
    folders = [(src, local.resolve()) for src in inputs
               if (local := local_path(str(src))) is not None and local.is_dir()]
    for src, data in folders:
        written = out.resolve() / data.name
        for other, into in folders:
            if written == into or into in written.parents or written in into.parents:
                raise UsageError(f"{flag} {out}: the outputs of {src} go to {written}, which "
                                 f"{'is' if written == into else 'overlaps'} the input folder {other}; "
                                 "choose a folder outside the inputs")


def refuse_output_in_bundles(out: Path, bundles: Iterable[Path], flag: str) -> None:
    """An output may not be, or lie inside, a bundle used: its files would change the bundle (a shipped one
    too), and ``train --force`` would then refuse to replace it.

    Raises:
        UsageError: which bundle holds ``out``.
    """
    dest = out.resolve()
    for bundle in bundles:
        held = Path(bundle).resolve()
        if dest == held or held in dest.parents:
            raise UsageError(f"{flag} {out} is inside the bundle {bundle}: its files would change the bundle; "
                             "choose a folder outside it")


def make_output_folder(out: Path, flag: str) -> None:
    """Create an output folder (and its parents) before any input is read.

    Raises:
        UsageError: why it cannot be made (a read-only place, a file on the way, ``/proc``), naming the flag.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {out} cannot be made: {exc.strerror or exc}") from exc


def refuse_output_inside(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """An output folder may not be, or lie inside, an input folder: the next run would read its files
    (maps, reports, denoised images) as input, and a report would replace files of the data.

    Raises:
        UsageError: which input holds ``out``.
    """
    dest = out.resolve()
    for src in inputs:
        local = local_path(str(src))
        if local is None or not local.is_dir():
            continue
        data = local.resolve()
        if dest == data or data in dest.parents:
            raise UsageError(f"{flag} {out} is inside the input folder {src}: its files would be mixed with the "
                             "data and read as input by the next run; choose a folder outside it")


def _digits(options: dict[str, str], src: str) -> list[int] | None:
    if "digits" not in options:
        return None
    try:
        digits = [int(d) for d in options["digits"].split(",")] if options["digits"].strip() else []
    except ValueError as exc:  # also an empty item: digits=1,,2
        raise SourceError(f"{src}: digits must be comma-separated integers, e.g. ?digits=0,1") from exc
    if not digits:
        raise SourceError(f"{src}: digits= is empty")
    return digits


def _limit(options: dict[str, str], src: str) -> int | None:
    """The ``limit=N`` option (None without one).

    Raises:
        SourceError: not an integer of at least 1.
    """
    if "limit" not in options:
        return None
    try:
        limit = int(options["limit"])
    except ValueError as exc:
        raise SourceError(f"{src}: limit must be an integer") from exc
    if limit < 1:
        raise SourceError(f"{src}: limit must be at least 1, not {limit}")
    return limit


def _filter(x: np.ndarray, labels: np.ndarray | None, options: dict[str, str], src: str) -> tuple:
    digits = _digits(options, src)
    if digits is not None:
        if labels is None:
            raise SourceError(f"{src}: this source has no labels (one per image), so ?digits= cannot filter it")
        keep = np.isin(labels, digits)
        x, labels = x[keep], labels[keep]
    limit = _limit(options, src)
    if limit is not None and limit < len(x):  # a copy: a view would keep the whole set in memory
        x = x[:limit].copy()
        labels = None if labels is None else labels[:limit].copy()
    if len(x) == 0:
        raise SourceError(f"{src} holds no images after filtering")
    return x, labels


def _elpv_folder(src: str) -> Path:
    """The elpv-dataset package's data folder.

    Raises:
        SourceError: the package is not installed (one line saying how to install it).
    """
    try:
        import elpv_dataset
    except ImportError as exc:
        raise SourceError(f"{src} needs the elpv-dataset package: pip install 'aemon[elpv]' "
                          "(or pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _elpv_labels(src: str) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The elpv-dataset package's folder, image paths, defect probabilities and module types."""
    folder = _elpv_folder(src)
    data = np.genfromtxt(folder / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    return folder, np.char.decode(data["path"]), data["probability"], np.char.decode(data["type"])


def _sample_elpv(options: dict[str, str], prep: Preprocessing, limits: Limits, src: str) -> tuple:
    """sample:elpv: real solar-cell electroluminescence images, filtered by type, defect and split.

    Labels are the defect probabilities (0, 1/3, 2/3, 1). The split is a fixed seeded 70/30
    permutation of the whole set, so a ``train`` and a ``test`` selection never share an image. The images
    come in a fixed shuffled order, the same for every selection, so the first N are a fair sample.
    """
    folder, paths, probs, types = _elpv_labels(src)
    keep = np.ones(len(paths), bool)
    if "type" in options:
        if options["type"] not in ("mono", "poly"):
            raise SourceError(f"{src}: type must be mono or poly")
        keep &= types == options["type"]
    if "defect" in options:
        wanted = [v.strip() for v in options["defect"].split(",") if v.strip()]
        if not wanted or any(v not in _ELPV_DEFECTS for v in wanted):
            raise SourceError(f"{src}: defect must be among 0, 1/3, 2/3, 1 (comma-separated), e.g. defect=0")
        keep &= np.isin(np.round(probs, 3), [round(_ELPV_DEFECTS[v], 3) for v in wanted])
    if "split" in options:
        split = options["split"]
        if split not in ("train", "test"):
            raise SourceError(f"{src}: split must be train or test")
        order = np.random.default_rng(0).permutation(len(paths))
        in_train = np.zeros(len(paths), bool)
        in_train[order[: round(ELPV_TRAIN_SHARE * len(paths))]] = True
        keep &= in_train if split == "train" else ~in_train
    chosen = np.flatnonzero(keep)
    if len(chosen) == 0:
        raise SourceError(f"{src} selects no images")
    # The package lists the cells module by module (the first 100: 68 % defective, 60 % mono, against 43 % and
    # 41 % overall); the sample's order is a fixed shuffle, so that the first N (?limit=N) are like the rest.
    place = np.empty(len(paths), np.int64)
    place[np.random.default_rng(1).permutation(len(paths))] = np.arange(len(paths))
    chosen = chosen[np.argsort(place[chosen])]
    chosen = chosen[: _limit(options, src)]  # ?limit=N decodes the first N only
    _check_room(len(chosen), prep, src)
    x = np.stack([decode_image(folder / paths[i], prep, limits) for i in chosen])
    return x, probs[chosen]


def sample_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits (500 per class) shipped inside aemon (``aemon/_data``): images
    ``(5000, 28, 28)`` uint8 and labels ``(5000,)`` int64, the classes taking turns (0, 1, ..., 9, 0, 1, ...),
    so that the first N (``?limit=N``) hold every digit, not N zeros (the file is sorted by class)."""
    from importlib.resources import as_file, files

    with as_file(files("aemon") / "_data" / "mnist-5k.npz") as path, np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"].astype(np.int64)
    turn = np.empty(len(y), dtype=np.int64)  # each image's place among its class (stable)
    for label in np.unique(y):
        turn[y == label] = np.arange(np.count_nonzero(y == label))
    order = np.lexsort((y, turn))
    return x[order], y[order]


def _keras_dataset(name: str, split: str, src: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in _KERAS:
        raise SourceError(f"{src}: unknown Keras dataset {name!r}; known: {', '.join(_KERAS)}")
    if split not in ("train", "test", "all"):
        raise SourceError(f"{src}: split must be train, test or all")
    from aemon.logs import quiet_tensorflow

    quiet_tensorflow()
    import keras

    loader = getattr(keras.datasets, name)
    try:
        # Keras prints "Downloading data from ..." on stdout, which is where records go.
        with contextlib.redirect_stdout(sys.stderr):
            (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types
        raise SourceError(
            f"could not load {name} through Keras ({type(exc).__name__}: {exc}); it downloads on first use. "
            "Offline, use sample:mnist (ships with aemon) or a local .npy/.npz file or image folder"
        ) from exc
    if split == "train":
        return x_train, y_train
    if split == "test":
        return x_test, y_test
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def list_images(folder: Path, *, arrays: bool = False) -> list[Path]:
    """Image files (and with ``arrays``, array files) under ``folder``, recursively, sorted.

    Hidden names (and anything inside hidden folders) are skipped. Every other entry with such a name but a
    folder is listed, links, FIFOs and the like too, so that reading it names what it is instead of it being
    left out without a word.
    """

    def wanted(path: Path) -> bool:
        return is_image_name(path.name) or (arrays and is_array_name(path.name))

    return sorted(
        p for p in folder.rglob("*")
        if wanted(p) and (p.is_symlink() or not p.is_dir())
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or None where it cannot be told."""
    try:
        with open("/proc/meminfo") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_room(n: int, prep: Preprocessing, src: str) -> None:
    """Refuse decoding ``n`` images at the bundle's size when they would not fit in memory (the process would be
    killed without a word, minutes later)."""
    needed = n * math.prod(prep.input_shape) * 4  # float32 model input
    room = available_memory()
    if room is not None and needed > room // 2:
        h, w, c = prep.input_shape
        raise SourceError(f"{src}: {n} images at {h}x{w}x{c} take {needed / 2**30:.1f} GiB as model input, more "
                          f"than half the {room / 2**30:.1f} GiB of memory available; choose a smaller --size or "
                          "fewer images")


def _folder(path: Path, prep: Preprocessing, limits: Limits, src: str, most: int | None = None) -> np.ndarray:
    """Every image of the folder (the first ``most``, in path order), decoded."""
    files = list_images(path)
    if not files:
        raise SourceError(f"{src}: no images found (looked for PNG, JPEG, BMP, TIFF, WebP, GIF recursively)")
    files = files[:most]
    _check_room(len(files), prep, src)
    images, refused = [], []
    for file in files:
        try:
            images.append(decode_image(file, prep, limits))
        except ItemRejected as exc:  # its message starts with the file's name: the path below the folder instead
            rel, why = str(file.relative_to(path)), str(exc)
            refused.append(rel + why[len(file.name):] if why.startswith(file.name) else f"{rel}: {why}")
    if refused:  # every one named at once: the user fixes the folder in one go
        shown = "; ".join(refused[:MAX_NAMED]) + ("; ..." if len(refused) > MAX_NAMED else "")
        raise SourceError(f"{src}: {len(refused)} of {len(files)} files cannot be read as images ({shown}); "
                          "remove or fix them")
    return np.stack(images)


def _array_file(path: Path, options: dict[str, str], prep: Preprocessing, limits: Limits, src: str) -> tuple:
    try:
        raw, key = read_array(path, limits, options.get("key"))
        x = array_to_input(raw, prep, f"{path.name}[{key}]" if key else path.name)
    except ItemRejected as exc:
        raise SourceError(f"{src}: {exc}") from exc
    labels = None
    if key is not None and key.startswith("x"):
        label_key = "y" + key[1:]
        with np.load(path, allow_pickle=False) as archive:
            if label_key in archive.files:
                labels = archive[label_key]
                if labels.shape != (len(x),):  # not one label per image (one-hot, a scalar): no labels
                    labels = None
    return x, labels


def load_source(src: str, prep: Preprocessing = Preprocessing(), limits: Limits = Limits()) -> Dataset:
    """Read every image of ``src``.

    Raises:
        SourceError: one line saying what is wrong with the source and what to do.
    """
    base, options = _split_query(src)
    if base == "sample:elpv":
        x, labels = _sample_elpv(options, prep, limits, src)
        options = {k: v for k, v in options.items() if k not in ("split", "type", "defect")}
    elif base.startswith("sample:"):
        if base != "sample:mnist":
            raise SourceError(f"{src}: the samples are sample:mnist and sample:elpv")
        raw, labels = sample_mnist()
        x = array_to_input(raw, prep, base)
    elif base.startswith("keras:"):
        raw, labels = _keras_dataset(base.removeprefix("keras:"), options.get("split", "train"), src)
        x = array_to_input(raw, prep, base)
    else:
        path = Path(base)
        if not path.exists():
            raise SourceError(f"{src}: no such file or directory")
        if path.is_dir():  # ?limit=N decodes the first N only
            x, labels = _folder(path, prep, limits, src, _limit(options, src)), None
        elif path.suffix.lower() in (".npy", ".npz"):
            x, labels = _array_file(path, options, prep, limits, src)
        elif is_image_name(path.name):
            try:
                x, labels = decode_image(path, prep, limits)[None], None
            except ItemRejected as exc:
                raise SourceError(f"{src}: {exc}") from exc
        else:
            raise SourceError(
                f"{src}: not a data source; give an image folder, a .npy/.npz file, keras:mnist, "
                "keras:fashion_mnist or sample:mnist"
            )
    x, labels = _filter(x, labels, options, src)
    return Dataset(x=x, labels=labels, source=src)


def write_samples(out: Path, count: int = 5) -> list[Path]:
    """Write ``count`` real digits from ``sample:mnist`` as PNGs, and one image that is not a digit.

    For a first try of the daemon: the digits should land in ``ok/``, the noise in ``anomaly/``.
    All or nothing: existing files are never replaced (the call fails before writing any, naming the first
    taken), each file appears whole under its name, and a failure removes those this call wrote.

    Raises:
        FileExistsError: a sample's name is taken in ``out``.
        OSError: a write failed (nothing of this call is left).
    """
    from PIL import Image

    from aemon.fsio import write_durably

    x, y = sample_mnist()
    rng = np.random.default_rng(0)
    by_label = [np.flatnonzero(y == d) for d in range(10)]
    picks = [by_label[k % 10][k // 10] for k in range(count)]  # one of each digit, then the next of each
    images = {f"digit-{int(y[i])}-{k}.png": x[i] for k, i in enumerate(picks)}
    images["noise.png"] = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    for name in images:
        if os.path.lexists(out / name):
            raise FileExistsError(errno.EEXIST, "exists", str(out / name))
    written: list[Path] = []
    try:
        for name, pixels in images.items():
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            write_durably(out / name, png.getvalue(), replace=False)  # never over a file made meanwhile
            written.append(out / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def choose_input(src: str, size: str = "auto", color: str = "auto") -> tuple[Preprocessing, dict[str, str]]:
    """The input size and colour mode for training on ``src``, decided from the data when ``auto``.

    * size: the median height and width of the images, scaled down (aspect kept) so the longer side
      is at most :data:`MAX_AUTO_SIDE`, each side rounded to a multiple of 4 (at least 8), which
      every architecture takes; for an array, the size of its rows (arrays are never resized);
      ``HxW`` is taken as given.
    * colour: ``rgb`` if any inspected image has colour (its channels differ), else ``grayscale``.

    Returns:
        The preprocessing, and a sentence per choice saying how it was made (printed, stored).
    """
    sizes, colourful, how = _inspect(src)
    why: dict[str, str] = {}
    if size == "auto" and not sizes:
        raise SourceError(f"{src}: flat rows (N, H*W) have no image size; give --size HxW")
    if size == "auto" and how == ARRAY_ROWS:  # rows are never resized: the bundle takes them as they are
        hw = sizes[0]
        why["size"] = f"auto: {hw[0]}x{hw[1]}, the {how} (arrays are taken at their own size)"
    elif size == "auto":
        h, w = _median_size(sizes)
        scale = min(1.0, MAX_AUTO_SIDE / max(h, w))
        hw = tuple(max(8, 4 * round(side * scale / 4)) for side in (h, w))
        seen = f"the median image size {h}x{w} of {len(sizes)} {how}" if len(sizes) > 1 else f"{h}x{w}, the {how}"
        why["size"] = (f"auto: {hw[0]}x{hw[1]} from {seen}"
                       + (f", scaled so the longer side is at most {MAX_AUTO_SIDE}" if scale < 1 else ""))
    else:
        try:
            hw = tuple(int(v) for v in size.lower().split("x"))
            if len(hw) != 2 or min(hw) < 4 or max(hw) > 4096:
                raise ValueError
        except ValueError:
            raise SourceError(f"--size must be auto or HxW (e.g. 64x64, sides 4 to 4096), got {size!r}") from None
        why["size"] = f"given: {hw[0]}x{hw[1]}"
    if color == "auto":
        mode = "rgb" if colourful else "grayscale"
        why["color"] = f"auto: {mode} ({'colour' if colourful else 'no colour'} in the inspected data)"
    elif color in ("grayscale", "rgb"):
        mode = color
        why["color"] = f"given: {mode}"
    else:
        raise SourceError(f"--color must be auto, grayscale or rgb, got {color!r}")
    return Preprocessing(color_mode=mode, size=(int(hw[0]), int(hw[1]))), why


def unlike_input(src: str, prep: Preprocessing) -> str | None:
    """How the images of ``src`` differ from a bundle's input in colour or aspect, or None.

    Such images are still usable (converted and resized as the daemon converts items), but a
    threshold calibrated on them fits them, not what the bundle was made for: callers warn.
    """
    sizes, colourful, _ = _inspect(src)
    h, w = _median_size(sizes) if sizes else prep.size  # flat rows: the bundle's own size
    (bh, bw), notes = prep.size, []
    if colourful and prep.color_mode == "grayscale":
        notes.append("their colour is dropped")
    elif not colourful and prep.color_mode == "rgb":
        notes.append("grey images are repeated on three channels")
    if abs(math.log((h / w) / (bh / bw))) > math.log(1.1):
        notes.append("they are resized without keeping their aspect")
    if not notes:
        return None
    return (f"the images of {src} ({h}x{w}, {'colour' if colourful else 'grey'}) are unlike this bundle's input "
            f"({bh}x{bw} {prep.color_mode}): {'; '.join(notes)}")


def _median_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The median height and the median width (upper middle for an even count)."""
    heights, widths = sorted(h for h, _ in sizes), sorted(w for _, w in sizes)
    return heights[len(heights) // 2], widths[len(widths) // 2]


#: How :func:`_inspect` names an array's size: every row has it, and rows are not resized.
ARRAY_ROWS = "size of every row of the array"


def _inspect(src: str) -> tuple[list[tuple[int, int]], bool, str]:
    """Image sizes ``(H, W)`` and whether any image has colour, from headers where possible."""
    base, options = _split_query(src)
    if base in ("sample:mnist",) or base.startswith("keras:"):
        return [(28, 28)], False, "size of every image of the data set"
    if base == "sample:elpv":
        _elpv_folder(src)  # not installed: one line saying how to install it, before any choice is printed
        return [(300, 300)], False, "size of every image of the data set"
    path = Path(base)
    if path.suffix.lower() in (".npy", ".npz") and path.is_file():
        try:
            raw, _ = read_array(path, Limits(), options.get("key"))
        except ItemRejected as exc:
            raise SourceError(f"{src}: {exc}") from exc
        if raw.ndim == 2:  # flat rows (N, H*W): only a given size says their shape
            return [], False, ARRAY_ROWS
        if raw.ndim < 2 or raw.ndim > 4:
            raise SourceError(f"{src}: an array of shape {raw.shape} ({raw.ndim}-D) is not a stack of images; give "
                              "(N, H, W), (N, H*W), (N, H, W, 1) or (N, H, W, 3)")
        if raw.ndim == 4 and raw.shape[-1] not in (1, 3):
            hint = "; it looks channels-first: transpose it to (N, H, W, C)" if raw.shape[1] in (1, 3) else ""
            raise SourceError(f"{src}: rows of shape {raw.shape[1:]} are not (H, W, 1) or (H, W, 3) images{hint}")
        colourful = raw.ndim == 4 and raw.shape[-1] == 3
        return [(int(raw.shape[1]), int(raw.shape[2]))], colourful, ARRAY_ROWS
    if is_named(base):
        raise SourceError(f"{src}: the samples are sample:mnist and sample:elpv; Keras' are keras:mnist and "
                          "keras:fashion_mnist")
    if not path.exists():
        raise SourceError(f"{src}: no such file or directory")
    files = list_images(path)[: _limit(options, src)] if path.is_dir() else [path]  # the images that are used
    if not files:
        raise SourceError(f"{src}: no images found (looked for PNG, JPEG, BMP, TIFF, WebP, GIF recursively)")
    sizes, colourful, unreadable = [], False, []
    # Spread over the whole list, not its first files: a folder sorted by camera or date would
    # otherwise be judged by one end of it.
    picked = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(len(files), _INSPECT)).astype(int))]
    for file in picked:
        try:
            # Opened as an item is (no link followed, a FIFO never waited on), then by Pillow.
            with open_file(file, Limits()) as fp, open_image(fp, file.name) as img:
                width, height = displayed_size(img)
                sizes.append((height, width))
                if not colourful and img.mode not in ("1", "L", "LA", "I", "F") and not img.mode.startswith("I;16"):
                    # As decoding sees it: a fully transparent pixel is black whatever colour it stores.
                    rgb = np.asarray(over_black(img).convert("RGB").resize((32, 32)), dtype=np.int16)
                    colourful = bool(np.abs(rgb[..., 0] - rgb[..., 1]).max() > 8
                                     or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 8)
        except (OSError, ItemRejected) as exc:  # named with every other one when the folder is read
            unreadable.append(f"{file.name} is not a readable image: {exc}")
    if not sizes:
        if path.is_dir():  # names every file that cannot be read, as reading the folder would
            _folder(path, Preprocessing(), Limits(), src)
        raise SourceError(f"{src}: {unreadable[0]}")
    return sizes, colourful, "images inspected"
