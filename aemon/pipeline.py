"""The path of an item from file to decision, shared by the daemon and the one-shot verbs.

units (:mod:`aemon.units`) → :func:`decode` → :func:`decide` (one model call for a batch) →
:func:`plan` (what gets written where: the item itself, array parts, denoised outputs, each with
its record). The daemon carries a plan out crash-safely (:mod:`aemon.commit`); ``aemon score``
prints the records and ``aemon denoise`` writes the reconstructions, both with :func:`score_paths`
and :func:`denoise_paths` below.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aemon.calibration import Verdict
from aemon.calibration import decide as verdicts_of
from aemon.errors import EmptyItem, ItemRejected, Unreadable
from aemon.fsio import utc_now
from aemon.images import PNG_LEVEL, Limits, Preprocessing, input_to_array
from aemon.images import decode as decode_file
from aemon.logs import get_logger
from aemon.maps import render, strengths
from aemon.records import rejected_record, scored_record
from aemon.router import Router, png_bytes, png_name, rows_bytes
from aemon.sources import load_source
from aemon.units import MAX_NAME_BYTES, Unit, check_file, short_name

__all__ = ["Output", "decode", "decide", "plan", "score_paths", "denoise_paths"]

#: Images gathered before one model call in the one-shot verbs.
FLUSH_IMAGES = 1024


def decode(unit: Unit, prep: Preprocessing, limits: Limits) -> None:
    """Fill ``unit.x`` (and ``raw``/``key`` for arrays); links and special files are never opened.

    Raises:
        ItemRejected: why the unit cannot be scored.
    """
    check_file(unit)
    try:
        decoded = decode_file(unit.path, prep, limits, unit.rel)
    except ItemRejected:
        raise
    except Exception as exc:  # a decoder's own bug or limit: one bad file never stops the daemon
        get_logger().warning("item.decode_error", item=unit.rel, exc_info=True)
        raise Unreadable(f"{unit.rel} could not be decoded ({type(exc).__name__}: {exc})") from exc
    unit.x, unit.raw, unit.key = decoded.x, decoded.raw, decoded.key
    unit.source, unit.look = decoded.source, decoded.look


def decide(units: list[Unit], bundle, reconstruct: bool = False, maps: str = "off",
           progress: Callable[[], None] = lambda: None) -> tuple[list[float], np.ndarray]:
    """Score decoded ``units`` with one model call (a slice at a time for a large batch); set their scores,
    p-values, verdicts (and reconstructions).

    Args:
        units: Decoded units (``x`` set); ``x`` is released afterwards.
        bundle: The loaded bundle.
        reconstruct: Keep the reconstructions (denoise mode), scoring them in numpy.
        maps: ``anomaly`` draws an anomaly map of each anomalous image (or row), ``all`` of every
            one, ``off`` none (:mod:`aemon.maps`); the maps cost one more model call for those rows.
        progress: Called between slices of a large batch (the daemon's liveness heartbeat).

    Returns:
        Seconds spent in each model call (one per slice), and every score of the batch.
    """
    x = units[0].x if len(units) == 1 else np.concatenate([u.x for u in units])
    recons, parts, calls = [], [], []
    for part in _slices(x):
        started = time.perf_counter()
        if reconstruct:
            recons.append(bundle.scorer.reconstruct(part))
            parts.append(bundle.scorer.score_of(part, recons[-1]))
        else:
            parts.append(bundle.score(part))
        calls.append(time.perf_counter() - started)
        progress()
    scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
    recon = None if not reconstruct else recons[0] if len(recons) == 1 else np.concatenate(recons)
    pvals = bundle.p_values(scores)
    # Denoise mode decides nothing: every original goes to ok/ (the contract); its record keeps the score.
    verdicts = [Verdict.OK.value] * len(scores) if reconstruct else verdicts_of(scores, bundle.threshold)
    i = 0
    for unit in units:
        part = slice(i, i + len(unit.x))
        i += len(unit.x)
        unit.scores, unit.p_values, unit.verdicts = scores[part], pvals[part], verdicts[part]
        unit.recon = None if recon is None else recon[part]
    if maps != "off":
        _draw_maps(units, bundle, maps, progress)
    for unit in units:
        unit.x = None  # the pixels are no longer needed; the batch may wait for its commit
    return calls, scores


#: Most pixel values scored or mapped between two progress calls (5,350 rows of 28x28, 256 of 128x128).
SLICE_VALUES = 1 << 22


def _slices(x: np.ndarray) -> list[np.ndarray]:
    """``x`` cut into runs of rows of at most :data:`SLICE_VALUES` values (one run for most batches)."""
    rows = max(1, SLICE_VALUES // max(1, x[0].size))
    return [x[i : i + rows] for i in range(0, len(x), rows)] if len(x) else [x]


#: Most maps drawn for one item (an array's rows): those of its highest scores. A 152 KB compressed array of
#: 200,000 blank rows, every one anomalous, wrote 814 MB of maps and held its batch for two minutes.
MAX_MAPS_PER_ITEM = 1000


def _rows_to_map(unit: Unit, maps: str) -> list[int]:
    """The rows of ``unit`` that get a map: each anomalous one (every one with ``all``), at most
    :data:`MAX_MAPS_PER_ITEM` (the highest scores; ``unit.maps_left_out`` then marks the others)."""
    wanted = np.array([maps == "all" or verdict == "anomaly" for verdict in unit.verdicts], bool)
    rows = np.flatnonzero(wanted)
    if len(rows) <= MAX_MAPS_PER_ITEM:
        return rows.tolist()
    top = rows[np.argsort(-unit.scores[rows], kind="stable")[:MAX_MAPS_PER_ITEM]]
    wanted[top] = False
    unit.maps_left_out = wanted
    return np.sort(top).tolist()


def _draw_maps(units: list[Unit], bundle, maps: str, progress: Callable[[], None]) -> None:
    wanted = [(unit, row) for unit in units for row in _rows_to_map(unit, maps)]
    if not wanted:
        return
    rows = max(1, min(256, SLICE_VALUES // wanted[0][0].x[0].size))  # a map costs about a millisecond
    for start in range(0, len(wanted), rows):
        some = wanted[start : start + rows]
        x = np.stack([unit.x[row] for unit, row in some])
        if all(unit.recon is not None for unit, _ in some):  # denoise mode: reconstructed already
            recon = np.stack([unit.recon[row] for unit, row in some])
        else:
            recon = bundle.scorer.reconstruct(x)
        for (unit, row), image, strength in zip(some, x, strengths(bundle, x, recon), strict=True):
            unit.maps[row] = render(image, strength, unit.look.size if unit.look is not None else None)
        progress()


@dataclass
class Output:
    """One thing to place under a result folder: the unit's own file (``data`` None) or new bytes."""

    folder: str
    rel: str
    data: bytes | None = None
    #: The record written beside it (its ``path`` is filled in once the name is chosen).
    record: dict[str, Any] | None = None
    #: Record field of the unit's later outputs that names this output's path (``denoised``).
    names_as: str | None = None
    #: An anomaly map: placed at the previous output's name + ``map_suffix``, named in its record
    #: (``map``, or the ``map`` of row ``map_row`` of an array part).
    map_suffix: str | None = None
    map_row: int | None = None


def plan(unit: Unit, model: tuple[str | None, str | None], threshold: float | None) -> tuple[list[Output], bool]:
    """What routing ``unit`` writes, in order, and whether its source file is removed afterwards.

    An image or a rejected file is placed itself; an array is split into one part per verdict
    (the source removed); in denoise mode the reconstruction comes first.

    Args:
        unit: A decided or rejected unit.
        model: The bundle's name and version.
        threshold: The bundle's threshold.
    """
    common: dict[str, Any] = {"model_name": model[0], "model_version": model[1],
                              "received_at": unit.received_at, "decided_at": utc_now()}
    if unit.batch:
        common["batch"] = unit.batch
    if unit.error is not None:
        record = rejected_record(item=unit.rel, reason=unit.error.reason, error=str(unit.error), **common)
        return [Output("rejected", unit.dest_rel, record=record)], False
    outputs: list[Output] = []
    if unit.raw is None:
        if unit.recon is not None:
            outputs.append(Output("denoised", png_name(unit.dest_rel), denoised_png(unit), names_as="denoised"))
        verdict = unit.verdicts[0]
        record = scored_record(item=unit.rel, verdict=verdict, score=float(unit.scores[0]), threshold=threshold,
                               p_value=float(unit.p_values[0]), **common)
        outputs.append(Output(verdict, unit.dest_rel, record=record))
        if 0 in unit.maps:
            outputs.append(Output(verdict, unit.dest_rel, unit.maps[0], map_suffix=".map.png"))
        return outputs, False
    raw = unit.raw
    if unit.recon is not None:
        outputs.append(Output("denoised", unit.dest_rel, denoised_rows(unit), names_as="denoised"))
    names = np.array(unit.verdicts)
    for verdict in ("ok", "anomaly"):
        idx = np.flatnonzero(names == verdict)
        if idx.size == 0:
            continue
        columns = (idx.tolist(), unit.scores[idx].tolist(), unit.p_values[idx].tolist())
        rows = [{"index": j, "score": score, "p_value": p} for j, score, p in zip(*columns, strict=True)]
        record = scored_record(
            item=unit.rel, verdict=verdict, score=float(np.max(unit.scores[idx])), threshold=threshold,
            p_value=float(np.min(unit.p_values[idx])), rows=rows, n_rows=int(idx.size), total_rows=len(raw),
            dtype=str(raw.dtype), **common,
        )
        if unit.key:
            record["array_key"] = unit.key
        left_out = 0 if unit.maps_left_out is None else int(np.count_nonzero(unit.maps_left_out[idx]))
        if left_out:
            record["maps_left_out"] = left_out
        part = rows_bytes(raw[idx], unit.rel, unit.key, source=unit.source, index=idx)
        outputs.append(Output(verdict, unit.dest_rel, part, record=record))
        outputs += [Output(verdict, unit.dest_rel, unit.maps[int(j)], map_suffix=f".map-{int(j)}.png", map_row=int(j))
                    for j in idx if int(j) in unit.maps]
    unit.close_source()
    return outputs, True


def denoised_rows(unit: Unit) -> bytes:
    """An array's reconstructions in the array's own shape and dtype (an ``.npz`` keeps its other arrays)."""
    return rows_bytes(input_to_array(unit.recon, unit.raw), unit.rel, unit.key, source=unit.source)


def denoised_png(unit: Unit) -> bytes:
    """An image's reconstruction as a PNG of the image's own size, colour (grey or RGB) and depth (8 bits,
    or 16 for 16-bit, 32-bit integer and float grey images)."""
    from PIL import Image

    if unit.look is None:
        return png_bytes(unit.recon[0])
    size, mode = unit.look.size, unit.look.mode
    deep = mode in ("I", "F") or mode.startswith("I;16")
    colour = not deep and mode not in ("1", "L", "LA")
    if deep:
        grey = Image.fromarray(unit.recon[0].mean(axis=-1).astype(np.float32), mode="F")
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.BILINEAR)
        return png_bytes(np.asarray(grey), bits=16)
    with Image.open(io.BytesIO(png_bytes(unit.recon[0]))) as recon:
        out = recon.convert("RGB" if colour else "L")
        if out.size != size:
            out = out.resize(size, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        out.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


# -- the one-shot verbs ----------------------------------------------------
def _units(paths: Iterable[Path]) -> Iterator[tuple[Unit, Path | None]]:
    """Each file argument as a unit; each folder argument as its files (with that folder)."""
    for path in paths:
        if path.is_dir():  # a folder the user named, through a link too; links inside it are items
            files = _folder_files(path)
            if not files:  # said, not skipped: the daemon rejects such a folder as empty too
                unit = Unit(path, path.as_posix(), arrived=time.time())
                unit.error = EmptyItem(f"{path} holds no files (hidden ones aside)")
                yield unit, None
            for file in files:
                yield Unit(file, file.as_posix(), arrived=time.time()), path
        else:
            yield Unit(path, path.as_posix(), arrived=time.time()), None


def _folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, links included and never followed (each is an item: one that is
    no image or array gets a rejected record, as if named alone); hidden names and folders are left out."""
    found: list[Path] = []
    for dirpath, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in links]
        found += [Path(dirpath, name) for name in [*files, *links] if not name.startswith(".")]
    return sorted(found)


def _decoded_batches(paths: Iterable[Path], prep: Preprocessing,
                     limits: Limits) -> Iterator[list[tuple[Unit, Path | None]]]:
    """Units in batches of up to :data:`FLUSH_IMAGES` images, in order; a rejected unit is a batch of its own.

    Files kept open by decoding (``.npz``) are closed once the caller has asked for the next batch."""
    for batch in _batches(paths, prep, limits):
        try:
            yield batch
        finally:
            for unit, _ in batch:
                unit.close_source()


def _batches(paths: Iterable[Path], prep: Preprocessing, limits: Limits) -> Iterator[list[tuple[Unit, Path | None]]]:
    batch: list[tuple[Unit, Path | None]] = []
    pending = 0
    for unit, root in _units(paths):
        try:
            if unit.error is not None:
                raise unit.error
            if not unit.path.exists() and not unit.path.is_symlink():
                raise Unreadable(f"{unit.path}: no such file or directory")
            decode(unit, prep, limits)
        except ItemRejected as exc:
            unit.error = exc
            if batch:
                yield batch
            batch, pending = [], 0
            yield [(unit, root)]
            continue
        batch.append((unit, root))
        pending += len(unit.x)
        if pending >= FLUSH_IMAGES:
            yield batch
            batch, pending = [], 0
    if batch:
        yield batch


def _rejected(unit: Unit, bundle) -> dict:
    return rejected_record(item=unit.rel, reason=unit.error.reason, error=str(unit.error),
                           received_at=unit.received_at, decided_at=utc_now(), model_name=bundle.name,
                           model_version=bundle.version)


def score_paths(bundle, paths: Iterable[Path | str], limits: Limits, maps: Path | None = None) -> Iterator[dict]:
    """``aemon score``: one record per image (per row for arrays and named datasets), in order.

    With ``maps``, the anomaly map of each anomalous image is written there (``NAME.map.png``,
    ``NAME.map-ROW.png`` for rows, a folder's images under their paths in it; a taken name gets ``-N``)
    and named in its record's ``map``.
    """
    router = Router(Path(os.path.abspath(maps))) if maps is not None else None
    paths = list(paths)
    # Named datasets (sample:..., keras:...) load first: one that cannot be used (an unknown option, another
    # shape, offline) stops the run before any record, not after some inputs with the rest never scored.
    # Each is let go once scored (one given twice is loaded twice).
    named = [load_source(arg, bundle.preprocessing, limits).x for arg in paths if isinstance(arg, str)]
    for arg in paths:
        if isinstance(arg, str):  # a named dataset: its images are rows
            units = [Unit(Path(arg), arg, arrived=time.time())]
            units[0].x = named.pop(0)
            yield from _score_records(bundle, units, router, maps, rows=True)
            continue
        for batch in _decoded_batches([arg], bundle.preprocessing, limits):
            units = [u for u, _ in batch]
            if units[0].error is not None:
                yield _rejected(units[0], bundle)
                continue
            yield from _score_records(bundle, units, router, maps, roots=[root for _, root in batch])


def _score_records(bundle, units: list[Unit], router: Router | None, maps: Path | None, rows: bool = False,
                   roots: list[Path | None] | None = None) -> Iterator[dict]:
    decide(units, bundle, maps="anomaly" if router is not None else "off")
    decided_at = utc_now()
    for unit, root in zip(units, roots or [None] * len(units), strict=True):
        is_rows = rows or unit.raw is not None
        for i in range(len(unit.scores)):
            extra: dict[str, Any] = {"index": i} if is_rows else {}
            if i in unit.maps:
                # A folder's images keep their paths under DIR, as the daemon's maps keep theirs.
                name = _output_name(unit, root) + (f".map-{i}.png" if is_rows else ".map.png")
                extra["map"] = _shown(router.write_new(unit.maps[i], "", name), maps)
            yield scored_record(item=unit.rel, verdict=unit.verdicts[i], score=unit.scores[i],
                                threshold=bundle.threshold, p_value=unit.p_values[i], model_name=bundle.name,
                                model_version=bundle.version, received_at=unit.received_at, decided_at=decided_at,
                                **extra)


def _shown(dest: Path, given: Path) -> str:
    """An output path as the user named its folder (``given``): relative to the working folder unless absolute."""
    return str(dest) if Path(given).is_absolute() else os.path.relpath(dest)


def _output_name(unit: Unit, root: Path | None) -> str:
    """The output name: under the folder argument's own name (``..`` and ``.`` name the folders they are) with
    its path there, else the file's own name; a file name too long to take a suffix (``.map.png``, ``-N``) is
    shortened as the daemon's are (:func:`short_name`)."""
    folder = Path(os.path.abspath(root)).name if root is not None else ""
    name = Path(folder) / unit.path.relative_to(root) if root is not None else Path(unit.path.name)
    if len(os.fsencode(name.name)) > MAX_NAME_BYTES:
        name = name.with_name(short_name(name.name))
    return name.as_posix()


def denoise_paths(bundle, paths: Iterable[Path], limits: Limits, out: Path) -> Iterator[dict]:
    """``aemon denoise``: write each item's reconstruction under ``out``; one record per item, in order.

    Images become 8-bit PNGs (``.png`` appended to other names); arrays keep their shape and
    dtype. Folder arguments keep their relative paths; an existing name gets a ``-N`` suffix (the
    same :class:`~aemon.router.Router` as the daemon's ``denoised/`` folder).
    """
    router = Router(Path(os.path.abspath(out)))
    for batch in _decoded_batches(paths, bundle.preprocessing, limits):
        if batch[0][0].error is not None:
            yield _rejected(batch[0][0], bundle)
            continue
        decide([u for u, _ in batch], bundle, reconstruct=True)
        for unit, root in batch:
            name = _output_name(unit, root)
            if unit.raw is None:
                dest = router.write_new(denoised_png(unit), "", png_name(name))
            else:
                dest = router.write_new(denoised_rows(unit), "", name)
            yield {"item": unit.rel, "denoised": _shown(dest, out), "rows": len(unit.scores),
                   "score": float(np.max(unit.scores)), "model": {"name": bundle.name, "version": bundle.version},
                   "received_at": unit.received_at, "decided_at": utc_now()}
