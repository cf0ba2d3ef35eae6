"""One-shot verbs: ``aemon score`` and ``aemon denoise`` expand paths into items and work in batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aemon.bundle import Bundle, utc_now
from aemon.calibration import decide
from aemon.errors import ItemRejected, Unreadable
from aemon.images import Limits, array_to_input, decode_file, input_to_array, is_array_name, read_array
from aemon.records import rejected_record, scored_record
from aemon.router import Router, png_bytes, png_name, rows_bytes
from aemon.settings import Settings
from aemon.sources import list_images, load_source

__all__ = ["expand_paths", "score_paths", "denoise_paths", "limits_from"]

#: Images gathered before one model call.
_FLUSH_IMAGES = 1024


@dataclass
class _Decoded:
    item: str
    x: np.ndarray
    received_at: str
    is_array: bool


def limits_from(settings: Settings) -> Limits:
    """The item size limits configured in ``settings``."""
    return Limits(max_bytes=settings.max_file_bytes, max_pixels=settings.max_image_pixels,
                  max_rows=settings.max_array_rows)


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Each file as given; each folder as its images and arrays, recursively, sorted."""
    for path in paths:
        if not str(path).startswith(("sample:", "keras:")) and path.is_dir():
            yield from list_images(path, arrays=True)
        else:
            yield path


def _records(bundle: Bundle, batch: list[_Decoded]) -> Iterator[dict]:
    x = np.concatenate([d.x for d in batch])
    scores = bundle.score(x)
    pvals = bundle.p_values(scores)
    verdicts = decide(scores, bundle.threshold)
    decided_at = utc_now()
    i = 0
    for d in batch:
        for row in range(len(d.x)):
            extra = {"index": row} if d.is_array else {}
            yield scored_record(
                item=d.item, verdict=verdicts[i], score=scores[i], threshold=bundle.threshold,
                p_value=pvals[i], model_name=bundle.name, model_version=bundle.version,
                received_at=d.received_at, decided_at=decided_at, **extra,
            )
            i += 1


def score_paths(bundle: Bundle, paths: Iterable[Path], settings: Settings) -> Iterator[dict]:
    """Score every item under ``paths``; rejected items yield rejected records, in order."""
    limits = limits_from(settings)
    prep = bundle.preprocessing
    batch: list[_Decoded] = []
    pending = 0
    for path in expand_paths(paths):
        received_at = utc_now()
        if str(path).startswith(("sample:", "keras:")):
            # A named dataset: every image is an item, like the rows of an array.
            data = load_source(str(path), prep, limits)
            batch.append(_Decoded(str(path), data.x, received_at, True))
            pending += len(data.x)
            continue
        try:
            if not path.exists():
                raise Unreadable(f"{path}: no such file or directory")
            x = decode_file(path, prep, limits)
        except ItemRejected as exc:
            yield from _records(bundle, batch) if batch else ()
            batch, pending = [], 0
            yield rejected_record(item=str(path), reason=exc.reason, error=str(exc), received_at=received_at,
                                  decided_at=utc_now(), model_name=bundle.name, model_version=bundle.version)
            continue
        batch.append(_Decoded(str(path), x, received_at, is_array_name(path.name)))
        pending += len(x)
        if pending >= _FLUSH_IMAGES:
            yield from _records(bundle, batch)
            batch, pending = [], 0
    if batch:
        yield from _records(bundle, batch)


def _denoise_target(path: Path, root: Path | None) -> str:
    """The output name of ``path``: relative to the folder argument it came from, else its own name."""
    if root is not None:
        return (Path(root.name) / path.relative_to(root)).as_posix()
    return path.name


def denoise_paths(bundle: Bundle, paths: Iterable[Path], settings: Settings, out: Path) -> Iterator[dict]:
    """Write each item's reconstruction under ``out``; yield one record per item, in order.

    Images become 8-bit PNGs (``.png`` appended to other names); arrays keep their shape and
    dtype. Folder arguments keep their relative paths; an existing name gets a ``-N`` suffix,
    as in the daemon's ``denoised/`` folder (the same :class:`~aemon.router.Router` writes both).
    Items are reconstructed in batches of up to 1,024 images, one compiled model call each.
    """
    limits = limits_from(settings)
    prep = bundle.preprocessing
    router = Router(out)
    batch: list[tuple[Path, str, str, np.ndarray, np.ndarray | None, str | None]] = []
    pending = 0
    for arg in paths:
        root = arg if arg.is_dir() else None
        for path in expand_paths([arg]):
            received_at = utc_now()
            try:
                if not path.exists():
                    raise Unreadable(f"{path}: no such file or directory")
                raw, key = read_array(path, limits) if is_array_name(path.name) else (None, None)
                x = decode_file(path, prep, limits) if raw is None else array_to_input(raw, prep, path.name)
            except ItemRejected as exc:
                yield from _denoise_batch(bundle, router, batch)
                batch, pending = [], 0
                yield rejected_record(item=str(path), reason=exc.reason, error=str(exc), received_at=received_at,
                                      decided_at=utc_now(), model_name=bundle.name, model_version=bundle.version)
                continue
            batch.append((path, _denoise_target(path, root), received_at, x, raw, key))
            pending += len(x)
            if pending >= _FLUSH_IMAGES:
                yield from _denoise_batch(bundle, router, batch)
                batch, pending = [], 0
    yield from _denoise_batch(bundle, router, batch)


def _denoise_batch(bundle: Bundle, router: Router, batch: list) -> Iterator[dict]:
    if not batch:
        return
    from aemon.scoring import reconstruction_error

    x = np.concatenate([item[3] for item in batch])
    recon = bundle.scorer.reconstruct(x)
    scores = reconstruction_error(x, recon, bundle.scorer.score_fn)
    i = 0
    for path, rel, received_at, xi, raw, key in batch:
        part = slice(i, i + len(xi))
        i += len(xi)
        if raw is None:
            dest = router.write_new(png_bytes(recon[part][0]), "", png_name(rel))
        else:
            dest = router.write_new(rows_bytes(input_to_array(recon[part], raw), rel, key), "", rel)
        yield {
            "item": str(path), "denoised": str(dest), "rows": len(xi), "score": float(np.max(scores[part])),
            "model": {"name": bundle.name, "version": bundle.version},
            "received_at": received_at, "decided_at": utc_now(),
        }
