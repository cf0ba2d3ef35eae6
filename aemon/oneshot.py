"""One-shot scoring for ``aemon score``: expand paths into items, score in batches, yield records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aemon.bundle import Bundle, utc_now
from aemon.calibration import decide
from aemon.errors import ItemRejected, Unreadable
from aemon.images import Limits, decode_file, is_array_name
from aemon.records import rejected_record, scored_record
from aemon.settings import Settings
from aemon.sources import list_images, load_source

__all__ = ["expand_paths", "score_paths", "limits_from"]

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
                item=d.item, verdict=verdicts[i].value, score=scores[i], threshold=bundle.threshold,
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
