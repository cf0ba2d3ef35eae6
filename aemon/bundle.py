"""Model bundles: a directory with ``model.keras`` and ``bundle.json``, saved atomically.

A bundle is written into a hidden temporary directory beside its destination, every file
fsync'd, then renamed into place, so a reader sees either no bundle or a whole one. Loading
checks the format version and the model file's sha256 before Keras reads it in safe mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aemon import __version__, fsio
from aemon.calibration import conformal_threshold, p_values
from aemon.errors import BundleError, CalibrationError
from aemon.fsio import utc_now, write_json_atomic
from aemon.images import Preprocessing

__all__ = [
    "FORMAT_VERSION",
    "MODEL_FILE",
    "META_FILE",
    "BundleMeta",
    "Bundle",
    "save_bundle",
    "staged_dir",
    "write_meta",
    "verified_model_file",
    "read_meta",
    "load_bundle",
    "default_bundle_path",
    "is_shipped",
    "shipped_bundle",
    "is_bundle",
    "replaceable",
    "find_bundle",
    "sha256_of",
]

#: Version of the bundle layout this aemon reads and writes.
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
META_FILE = "bundle.json"
#: Arrays a local score function learnt at training (per-cell error statistics), when it has any.
STATE_FILE = "score_state.npz"


#: A number as JSON writes it: an int or a float, never a string or a boolean coerced into one.
_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Calibration(BaseModel):
    """Where the threshold came from."""

    model_config = ConfigDict(extra="allow")
    source: str
    n: int = Field(ge=1, strict=True)
    #: Sorted calibration scores (for p-values).
    scores: list[_Number] = Field(min_length=1)
    created_at: str

    @model_validator(mode="after")
    def _n_is_the_count(self) -> Calibration:
        if self.n != len(self.scores):
            raise ValueError(f"n is {self.n} but {len(self.scores)} scores are stored")
        return self


class BundleMeta(BaseModel):
    """The contents of ``bundle.json``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int
    name: str
    arch: str
    task: Literal["detect", "denoise"] = "detect"
    input_shape: list[int]
    latent_dim: int | None = Field(None, ge=1, strict=True)
    preprocessing: dict[str, Any]
    score_fn: str
    threshold: _Number
    target_fpr: float = Field(gt=0, lt=1, strict=True)
    calibration: Calibration
    training: dict[str, Any]
    created_at: str
    aemon_version: str
    keras_version: str | None = None
    model_file: str = MODEL_FILE
    model_sha256: str
    #: The score function's state (:data:`STATE_FILE`) and its sha256, for local scores.
    score_state_file: str | None = None
    score_state_sha256: str | None = None
    #: Bumped by every recalibration of the same model file.
    revision: int = Field(1, ge=1, strict=True)

    @model_validator(mode="after")
    def _provenance_has_its_types(self) -> BundleMeta:
        """What the verbs read from the free-form sections has the types they were written with (a hand-edited
        ``bundle.json`` is refused with one line, not a traceback in ``info``, ``evaluate`` or ``calibrate``)."""
        choices = self.preprocessing.get("choices", {})
        if not isinstance(choices, dict) or not all(isinstance(v, str) for v in choices.values()):
            raise ValueError("preprocessing.choices must map each choice to a sentence")
        source = self.training.get("source")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"training.source must be a string, not {source!r}")
        for key, value in self.training.items():
            if key.startswith("n_") and not (type(value) is int and value >= 0):
                raise ValueError(f"training.{key} must be a count, not {value!r}")
        auto = getattr(self, "auto", None)
        if auto is not None and not isinstance(auto, dict):
            raise ValueError(f"auto must be an object, not {auto!r}")
        return self

    @model_validator(mode="after")
    def _threshold_is_calibrated(self) -> BundleMeta:
        """The threshold is always the conformal quantile of the stored calibration scores at the target FPR
        (train and calibrate write nothing else): any other value was set by hand, and its verdicts would not
        be those the FPR and p-values promise."""
        try:
            expected = conformal_threshold(np.asarray(self.calibration.scores), self.target_fpr)
        except CalibrationError as exc:
            raise ValueError(f"the calibration does not give a threshold: {exc}") from exc
        if self.threshold != expected:
            raise ValueError(f"threshold {self.threshold!r} is not the one its {self.calibration.n} calibration "
                             f"scores give at target FPR {self.target_fpr} ({expected!r}); bundle.json was edited: "
                             "restore it or train again (thresholds come from normal images: aemon calibrate on "
                             "the restored bundle, with --target-fpr for another rate)")
        return self

    @property
    def version(self) -> str:
        """The model version shown in records and metrics: sha256 prefix and revision."""
        return f"{self.model_sha256[:12]}-r{self.revision}"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fp:
        os.fsync(fp.fileno())


def _exists(out: Path) -> BundleError:
    return BundleError(f"{out} already exists; choose another --out or pass --force to replace it")


def staged_dir(out: Path, *, overwrite: bool = False):
    """A hidden folder beside ``out``, published as ``out`` on success (see :func:`aemon.fsio.staged_dir`).

    Raises:
        BundleError: ``out`` exists and ``overwrite`` is false.
    """
    return fsio.staged_dir(out, overwrite=overwrite, exists_error=_exists)


def save_bundle(model, meta: dict[str, Any], out: Path, *, overwrite: bool = False,
                state: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``model`` and its metadata as a bundle at ``out``, atomically.

    Args:
        model: The trained Keras model.
        state: The score function's state, written as :data:`STATE_FILE` when not empty.
        meta: Every ``bundle.json`` field except ``model_sha256``, ``format_version``,
            ``created_at`` and ``aemon_version``, which are filled in here.
        out: The bundle directory to create.
        overwrite: Replace an existing bundle at ``out``.

    Raises:
        BundleError: ``out`` exists (without ``overwrite``) or cannot be written.
    """
    import keras

    out = Path(out)
    with fsio.naming(out), staged_dir(out, overwrite=overwrite) as tmp:
        model_path = tmp / MODEL_FILE
        model.save(model_path)
        _fsync_file(model_path)
        extra = {}
        if state:
            state_path = tmp / STATE_FILE
            with state_path.open("xb") as fp:
                np.savez(fp, **state)
                fp.flush()
                os.fsync(fp.fileno())
            extra = {"score_state_file": STATE_FILE, "score_state_sha256": sha256_of(state_path)}
        full = {
            **meta,
            "format_version": FORMAT_VERSION,
            "created_at": meta.get("created_at") or utc_now(),
            "aemon_version": __version__,
            "keras_version": keras.__version__,
            "model_file": MODEL_FILE,
            "model_sha256": sha256_of(model_path),
            **extra,
        }
        BundleMeta.model_validate(full)
        write_json_atomic(tmp / META_FILE, full)
    return out


def verified_model_file(path: Path, meta: BundleMeta) -> Path:
    """The bundle's model file, present and with the sha256 that ``bundle.json`` names (no TensorFlow).

    Raises:
        BundleError: missing, changed or truncated.
    """
    model_path = _own_file(Path(path), meta.model_file, "model file")
    if not model_path.is_file():
        raise BundleError(f"{path} is incomplete: {meta.model_file} {_absence(model_path)}")
    actual = sha256_of(model_path)
    if actual != meta.model_sha256:
        raise BundleError(
            f"{model_path} does not match bundle.json (sha256 {actual[:12]}… != {meta.model_sha256[:12]}…); "
            "the file was changed or truncated, or the bundle was being replaced while it loaded (load it again): "
            "restore it or retrain"
        )
    return model_path


def _absence(path: Path) -> str:
    """Why a bundle file that is not a regular file cannot be read: missing, or something else in its place."""
    if path.is_symlink() and not path.exists():
        return "is a link to nothing"
    return "is not a regular file (a folder, a FIFO or a device)" if path.exists() else "is missing"


def read_meta(path: Path) -> BundleMeta:
    """Read and validate ``bundle.json`` (no model loading, no TensorFlow).

    Raises:
        BundleError: missing directory or file, bad JSON, unknown format version.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"no model bundle at {path} (expected a directory with {META_FILE} and {MODEL_FILE})")
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {META_FILE} {_absence(meta_path)}")
    try:
        raw = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than any bundle.json aemon writes
        raise BundleError(f"{meta_path} is not valid JSON: nested too deeply") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{meta_path} is not a JSON object")
    version = raw.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # True or "1" is no version
        raise BundleError(
            f"{path} has bundle format_version {version!r}; this aemon {__version__} reads version {FORMAT_VERSION} "
            "(the number)"
        )
    try:
        return BundleMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        msg = first["msg"].removeprefix("Value error, ")
        raise BundleError(f"{meta_path} is invalid: {where + ': ' if where else ''}{msg}") from exc


def write_meta(path: Path, meta: BundleMeta) -> None:
    """Replace a bundle's ``bundle.json`` atomically (used by recalibration)."""
    with fsio.naming(Path(path) / META_FILE):
        write_json_atomic(Path(path) / META_FILE, meta.model_dump(mode="json"))


@dataclass
class Bundle:
    """A loaded, verified bundle ready to score."""

    path: Path
    meta: BundleMeta
    model: Any
    scorer: Any

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return self.meta.version

    @cached_property
    def identity(self) -> str:
        """What this bundle scores with, exactly: its version and a digest of all of ``bundle.json`` (threshold,
        calibration scores, score state). Two calibrations of one model file can share a revision, so a
        version; never an identity."""
        text = json.dumps(self.meta.model_dump(mode="json"), sort_keys=True)
        return f"{self.version}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta.preprocessing)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per-image scores of model input ``x``."""
        return self.scorer.score(x)

    @cached_property
    def _calibration_scores(self) -> np.ndarray:
        return np.sort(np.asarray(self.meta.calibration.scores, dtype=np.float64))

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Share of calibration scores at or above each score."""
        return p_values(scores, self._calibration_scores)


def load_bundle(path: Path, *, chunk: int = 1024) -> Bundle:
    """Load a bundle, verifying its format and the model file's sha256.

    Raises:
        BundleError: any problem, with a message that says what to do.
    """
    from aemon.logs import get_logger, quiet_tensorflow

    quiet_tensorflow()
    import keras

    from aemon.scoring import Scorer, lookup

    path = Path(path)
    meta = read_meta(path)
    model_path = verified_model_file(path, meta)
    if meta.keras_version and meta.keras_version.split(".")[0] != keras.__version__.split(".")[0]:
        get_logger().warning("bundle.version_mismatch", bundle=str(path), saved_with=meta.keras_version,
                             running=keras.__version__)
    if not zipfile.is_zipfile(model_path):  # Keras would say "File not found" of a file that is there
        raise BundleError(f"{model_path} is not a Keras model file (a .keras file is a zip archive): restore the "
                          "bundle or train it again")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file
        raise BundleError(f"{model_path} could not be loaded by Keras: {exc}") from exc
    _check_input(path, meta, tuple(model.input_shape[1:]))
    _check_model(path, meta, model)
    state = _read_state(path, meta)
    try:
        if state and lookup(meta.score_fn).fit is None:
            raise ValueError(f"bundle.json names a score state, which {meta.score_fn!r} has none of")
        needed, size = lookup(meta.score_fn).min_side, tuple(model.input_shape[1:3])
        if min(size) < needed:
            raise ValueError(f"it compares image gradients, which need images of at least {needed}x{needed} "
                             f"pixels; this input is {'x'.join(map(str, size))}, so every image would score the same")
        scorer = Scorer(model, meta.score_fn, chunk=chunk, state=state)
        blank = np.zeros((1, *scorer.input_shape), np.float32)
        probe = scorer.score(blank)
        scorer.where(blank, scorer.reconstruct(blank))  # the map's numpy path reads the state too
    except Exception as exc:  # a state that does not fit its score function: KeyError, ValueError, TF errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: the model or its score state does not fit the {meta.score_fn!r} score "
                          f"function ({first}); retrain the bundle") from exc
    if not np.isfinite(probe).all():
        raise BundleError(f"{path}: the {meta.score_fn!r} score of a blank image is {probe[0]}; the score state "
                          "is broken: retrain the bundle")
    return Bundle(path=path, meta=meta, model=model, scorer=scorer)


def _check_input(path: Path, meta: BundleMeta, model_shape: tuple) -> None:
    """The preprocessing and ``input_shape`` of ``bundle.json`` must make exactly what the model takes.

    Raises:
        BundleError: a malformed preprocessing, or a shape unlike the model's.
    """
    try:
        prep = Preprocessing.from_dict(meta.preprocessing)
    except ValueError as exc:
        raise BundleError(f"{path}: bundle.json preprocessing is invalid: {exc}; restore it or retrain") from exc
    for what, shape in (("preprocessing", prep.input_shape), ("input_shape", tuple(meta.input_shape))):
        if shape != model_shape:
            raise BundleError(f"{path}: bundle.json {what} {'x'.join(map(str, shape))} does not match the model's "
                              f"input {'x'.join(map(str, model_shape))}; restore bundle.json or retrain")


def _check_model(path: Path, meta: BundleMeta, model) -> None:
    """``arch``, ``latent_dim`` and ``task`` in ``bundle.json`` must describe the model file (``info``, the
    ``aemon_model_info`` metric and ``denoise`` read them).

    Raises:
        BundleError: a value unlike the model's or the training's (bundle.json was edited).
    """
    held = model.name.removesuffix("_autoencoder")
    problem = None
    if held != meta.arch:
        problem = f"arch {meta.arch!r}, but {meta.model_file} holds a {held!r} network"
    elif meta.latent_dim is not None and any(layer.name == "encoder" for layer in model.layers):
        code = int(np.prod(model.get_layer("encoder").output.shape[1:]))
        if code != meta.latent_dim:
            problem = f"latent_dim {meta.latent_dim}, but the model's code has {code} numbers"
    denoised = meta.training.get("denoise")
    if problem is None and isinstance(denoised, bool) and denoised != (meta.task == "denoise"):
        problem = f"task {meta.task!r}, but the model was trained {'to denoise' if denoised else 'to detect'}"
    if problem is not None:
        raise BundleError(f"{path}: bundle.json says {problem}; bundle.json was edited: restore it or retrain")


def _own_file(path: Path, name: str, what: str) -> Path:
    """``path / name`` for a plain file name; anything else (a path out of the bundle) is refused."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise BundleError(f"{path}: bundle.json names its {what} {name!r}; it must be a file name inside the bundle")
    return path / name


def _read_state(path: Path, meta: BundleMeta) -> dict[str, np.ndarray]:
    """The score function's state, verified against its sha256 (empty when the bundle has none)."""
    import zipfile

    if not meta.score_state_file:
        return {}
    state_path = _own_file(path, meta.score_state_file, "score state")
    if not state_path.is_file():
        raise BundleError(f"{path} is incomplete: {meta.score_state_file} {_absence(state_path)}")
    if not meta.score_state_sha256:
        raise BundleError(f"{path}: bundle.json names {meta.score_state_file} but no score_state_sha256 to check it "
                          "against")
    if sha256_of(state_path) != meta.score_state_sha256:
        raise BundleError(f"{state_path} does not match bundle.json (sha256); the file was changed, or the bundle "
                          "was being replaced while it loaded (load it again): restore it or retrain")
    try:
        with np.load(state_path, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{state_path} is not a NumPy .npz of plain arrays: {exc}") from exc
    for key, value in state.items():
        if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
            raise BundleError(f"{state_path}: {key!r} holds non-numbers (NaN, infinity or another type); retrain")
    return {k: v.astype(np.float32) for k, v in state.items()}


def shipped_bundle(name: str) -> Path | None:
    """The bundle shipped with aemon under ``name`` (``mnist-detect``, ``mnist-denoise``), or None.

    Looks inside the installed package first (wheels carry the bundles as package data),
    then in the ``models/`` folder of a source checkout.
    """
    if not name or "/" in name or name.startswith("."):
        return None
    here = Path(__file__).resolve().parent
    for candidate in (here / "_bundles" / name, here.parent / "models" / name):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def is_shipped(path: str | os.PathLike) -> bool:
    """True when ``path`` is (or links to) a bundle shipped with aemon, given by its folder rather than its name."""
    try:
        where = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    found = shipped_bundle(where.name)
    return found is not None and found.resolve() == where


def is_bundle(path: Path) -> bool:
    """True for a folder holding ``bundle.json``."""
    return (Path(path) / META_FILE).is_file()


def replaceable(path: Path) -> str | None:
    """Why the folder ``path`` may not be replaced by a new bundle (``train --force``), or None: it must be an
    aemon bundle (``bundle.json`` with its ``format_version`` and ``model_sha256``) holding nothing but a bundle's
    files, so that nothing of the user's is lost with it."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or "format_version" not in meta or "model_sha256" not in meta:
        return f"holds a {META_FILE} that is not an aemon bundle's"
    others = sorted(set(os.listdir(path)) - {MODEL_FILE, META_FILE, STATE_FILE})
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"holds more than a bundle ({shown}): move them out first"
    return None


def find_bundle(arg: str | os.PathLike) -> Path | None:
    """A bundle argument as the verbs take it: a bundle folder, else a shipped bundle by name, else None."""
    return Path(arg) if is_bundle(Path(arg)) else shipped_bundle(os.fspath(arg))


def default_bundle_path(task: str = "detect") -> Path:
    """The bundle shipped with aemon for ``task`` (``detect`` or ``denoise``).

    Raises:
        BundleError: no default bundle is installed.
    """
    name = {"detect": "mnist-detect", "denoise": "mnist-denoise"}[task]
    found = shipped_bundle(name)
    if found is None:
        raise BundleError(f"the default {task} bundle {name!r} is not installed; pass a bundle path or set AEMON_MODEL")
    return found
