"""Training: fit an autoencoder on normal data, calibrate on a held-out part (or cross-fit), save a bundle."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from aemon.autoselect import AUTO_SCORES, Choice, choose_pca, choose_score, pick, split_for_selection
from aemon.bundle import save_bundle, utc_now
from aemon.calibration import conformal_threshold, required_samples
from aemon.errors import CalibrationError, UsageError
from aemon.images import Preprocessing
from aemon.logs import get_logger
from aemon.models import ARCHS, build, fit_pca, set_pca_weights
from aemon.scoring import SCORE_FUNCTIONS, Scorer, fit_state, lookup
from aemon.sources import Dataset, provenance
from aemon.synthetic import damage

__all__ = ["TrainConfig", "CalibrationPlan", "add_noise", "calibration_plan", "calibration_payload", "train_bundle"]

_OPTIMIZERS = ("adam", "adadelta", "rmsprop", "sgd")
#: Most fitted images a local score learns its per-place statistics from (a random subset beyond).
MAX_STATE_IMAGES = 5_000
#: Folds of a cross-fitted calibration (too few images to hold out what the target FPR needs).
CROSS_FIT_FOLDS = 5
#: Fewest images cross-fitting calibrates (each fold's model still fits on 16 or more).
MIN_CROSS_FIT = 20
#: Fewest images a model is fitted on.
MIN_FIT = 2


@dataclass
class TrainConfig:
    """Everything ``aemon train`` can set."""

    #: ``auto``: chosen from the training data (:mod:`aemon.autoselect`).
    arch: str = "auto"
    epochs: int = 20
    batch_size: int = 256
    latent_dim: int = 32
    denoise: bool = False
    noise_factor: float = 0.5
    target_fpr: float = 0.01
    #: Share of the data held out for calibration (never fitted).
    calibration_split: float = 0.1
    #: Share of the rest used for early stopping.
    validation_split: float = 0.1
    patience: int = 3
    optimizer: str = "adam"
    learning_rate: float | None = None
    loss: str = "binary_crossentropy"
    score_fn: str = "auto"
    seed: int = 0
    name: str | None = None

    def check(self) -> None:
        """Raise :class:`UsageError` for impossible values."""
        if self.arch not in ARCHS and self.arch != "auto":
            raise UsageError(f"unknown --arch {self.arch!r}; choose auto or one of {', '.join(ARCHS)}")
        if self.name is not None and (not self.name.strip() or "/" in self.name
                                      or any((ch.isspace() and ch != " ") or not ch.isprintable() for ch in self.name)):
            raise UsageError(f"--name {self.name!r}: a bundle name is one line of printable text without '/' (it "
                             "shows in records, logs and metric labels)")
        if self.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.patience < 0:
            raise UsageError(f"--patience must be 0 or more epochs, got {self.patience}")
        if not 0 <= self.seed < 2**32:
            raise UsageError("--seed must be between 0 and 4294967295")
        if self.latent_dim < 1:
            raise UsageError("--latent-dim must be at least 1")
        if not 0 <= self.noise_factor <= 10:
            raise UsageError("--noise-factor must be between 0 and 10")
        if not 0 < self.calibration_split < 1 or not 0 <= self.validation_split < 1:
            raise UsageError("--calibration-split must be in (0, 1) and --validation-split in [0, 1)")
        if self.optimizer not in _OPTIMIZERS:
            raise UsageError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(_OPTIMIZERS)}")
        if self.loss not in ("binary_crossentropy", "mse"):
            raise UsageError("--loss must be binary_crossentropy or mse")
        if self.arch == "pca" and self.denoise:
            raise UsageError("--arch pca fits clean data; train it without --denoise (its projection already denoises)")
        if self.score_fn not in SCORE_FUNCTIONS and self.score_fn != "auto":
            raise UsageError(f"--score must be auto or one of {', '.join(SCORE_FUNCTIONS)}")
        if not 0 < self.target_fpr < 1:  # NaN included
            raise UsageError(f"--target-fpr must be between 0 and 1 (exclusive), got {self.target_fpr}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be above 0, got {self.learning_rate}")
        required_samples(self.target_fpr)


@dataclass(frozen=True)
class CalibrationPlan:
    """Where the calibration scores come from: a held-out part, or out-of-fold scores (cross-fitting)."""

    #: Images held out, never fitted (0 when cross-fitted).
    held_out: int
    #: Folds of a cross-fitted calibration (0 when held out).
    folds: int
    #: One sentence, printed and stored.
    reason: str

    @property
    def method(self) -> str:
        return "cross_fit" if self.folds else "held_out"


def calibration_plan(n: int, cfg: TrainConfig, repeats: int = 0) -> CalibrationPlan:
    """How ``n`` images give the calibration scores, and why.

    ``--calibration-split`` of them held out; when that is fewer than the target FPR needs, exactly as many
    as it needs, provided at least as many are left to train on; below that, cross-fitting: each image is
    scored by one of :data:`CROSS_FIT_FOLDS` models fitted without its fold, so every image gives a score
    from a model that never saw it, and the bundle's model is fitted on all of them.

    Args:
        repeats: Exact repeats already dropped from the images given (named in the refusal).

    Raises:
        CalibrationError: too few images for an honest threshold, with the number needed.
    """
    share = math.floor(n * cfg.calibration_split)
    needed = required_samples(cfg.target_fpr)
    holding = needed + max(needed, MIN_FIT)  # the fewest images that hold ``needed`` out and train on the rest
    if share >= needed and n - share >= MIN_FIT:
        return CalibrationPlan(share, 0, f"{share} of {n} images held out "
                                         f"(--calibration-split {cfg.calibration_split})")
    if n >= holding:
        return CalibrationPlan(needed, 0, f"{needed} of {n} images held out: the {cfg.calibration_split:.0%} split "
                                          f"would hold out {share}, fewer than the {needed} a target FPR of "
                                          f"{cfg.target_fpr} needs")
    if n >= max(needed, MIN_CROSS_FIT):
        return CalibrationPlan(0, CROSS_FIT_FOLDS, (
            f"cross-fitted: {n} images are fewer than the {holding} that holding out {needed} (what a target FPR "
            f"of {cfg.target_fpr} needs) and training on as many would take, so each image is scored by one of "
            f"{CROSS_FIT_FOLDS} models fitted without its fifth of the data ({n} calibration scores); the bundle's "
            f"model is then fitted with none of the {n} held back"))
    least = min(holding, max(needed, MIN_CROSS_FIT))
    counted = f"{n} distinct images ({n + repeats} given, {repeats} exact repeats of others used once)" if repeats \
        else f"{n} images"
    raise CalibrationError(
        f"{counted} are too few for a target FPR of {cfg.target_fpr}: an honest threshold needs at least {least} "
        f"normal images; give more or raise --target-fpr"
    )


def distinct(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The images of ``x`` each once (the first of exact repeats kept, in order), and how many were dropped."""
    seen: set[bytes] = set()
    keep = []
    for i, image in enumerate(x):
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return (x, 0) if len(keep) == len(x) else (x[keep], len(x) - len(keep))


def add_noise(x: np.ndarray, noise_factor: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise scaled by ``noise_factor``, clipped back to [0, 1]."""
    noisy = x + noise_factor * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0)


def _fit_pca_model(model, x_fit: np.ndarray, cfg: TrainConfig) -> dict[str, list[float]]:
    """Set a ``pca`` model's weights from ``x_fit``; a history in the shape Keras returns."""
    mean, components, explained = fit_pca(x_fit, cfg.latent_dim)
    set_pca_weights(model, mean, components)
    recon = Scorer(model, "mse").reconstruct(x_fit)
    loss = float(np.mean(np.square(x_fit - recon)))
    return {"loss": [loss], "explained_variance": [explained]}


def _weights_only(model, cfg: TrainConfig, prep: Preprocessing):
    """The trained weights in a fresh, uncompiled model of the same architecture.

    Bundles are loaded with ``compile=False``, so the optimizer state (twice the weights, for
    Adam) would only make the model file three times larger.
    """
    if getattr(model, "optimizer", None) is None:
        return model
    fresh = build(cfg.arch, prep.input_shape, cfg.latent_dim)
    fresh.set_weights(model.get_weights())
    return fresh


def calibration_payload(scores: np.ndarray, target_fpr: float, source: str,
                        folds: int = 0) -> tuple[float, dict]:
    """Threshold and the ``calibration`` block of ``bundle.json`` for these normal scores (``folds``: of a
    cross-fitted calibration, 0 for scores of images the model never saw)."""
    threshold = conformal_threshold(scores, target_fpr)
    block = {
        "source": source,
        "n": len(scores),
        "scores": [float(s) for s in np.sort(scores)],
        "method": "cross_fit" if folds else "held_out",
        **({"folds": folds} if folds else {}),
        "created_at": utc_now(),
    }
    return threshold, block


class _EpochLog(keras.callbacks.Callback):
    """One structured log event per epoch (used when stdout is not a terminal)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.log = get_logger()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        fields = {k: round(float(v), 6) for k, v in (logs or {}).items()}
        self.log.info("train.epoch", epoch=epoch + 1, epochs=self.epochs, **fields)


def _optimizer(cfg: TrainConfig):
    cls = {
        "adam": keras.optimizers.Adam,
        "adadelta": keras.optimizers.Adadelta,
        "rmsprop": keras.optimizers.RMSprop,
        "sgd": keras.optimizers.SGD,
    }[cfg.optimizer]
    return cls(learning_rate=cfg.learning_rate) if cfg.learning_rate else cls()


def _usable_scores(cfg: TrainConfig, size: tuple[int, ...]) -> tuple[str, ...]:
    """The scores ``cfg`` may use on images of ``size``: the requested one, or the ``auto`` candidates that can
    tell images of that size apart.

    Raises:
        UsageError: the requested score cannot (a score of gradients on images under 3 pixels a side).
    """
    side = min(size)
    if cfg.score_fn == "auto":
        return tuple(kind for kind in AUTO_SCORES if lookup(kind).min_side <= side)
    needed = lookup(cfg.score_fn).min_side
    if needed > side:
        raise UsageError(f"--score {cfg.score_fn} compares image gradients, which need images of at least "
                         f"{needed}x{needed} pixels; these are {'x'.join(map(str, size))}: choose another --score")
    return (cfg.score_fn,)


def _resolve_auto(cfg: TrainConfig, x_fit: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, Choice | None]:
    """Settle ``--arch auto`` now (PCA candidates ranked on synthetic anomalies, :mod:`aemon.autoselect`).

    Returns:
        The images to fit, the images set aside to rank scores after fitting (``--score auto`` with
        a given architecture) or None, and the choice made here (or None).
    """
    scores = _usable_scores(cfg, x_fit.shape[1:3])
    if cfg.arch == "auto" and cfg.denoise:
        cfg.arch = "conv"  # the seed's denoiser: restoring images is what it was made for
    if cfg.arch == "auto":
        choice = choose_pca(x_fit, cfg.seed, scores)
        if choice is None:  # too few images to set any aside: the plainest model and score
            cfg.arch, cfg.latent_dim = "pca", min(cfg.latent_dim, len(x_fit) - 1, x_fit[0].size)
            cfg.score_fn = "mse" if cfg.score_fn == "auto" else cfg.score_fn
            return x_fit, None, None
        cfg.arch, cfg.latent_dim, cfg.score_fn = choice.arch, choice.latent_dim, choice.score_fn
        return x_fit, None, choice
    if cfg.score_fn != "auto":
        return x_fit, None, None
    fit_idx, sel_idx = split_for_selection(len(x_fit), cfg.seed)
    if not len(sel_idx):
        cfg.score_fn = "mse"
        return x_fit, None, None
    return x_fit[fit_idx], x_fit[sel_idx], None


def _fit(cfg: TrainConfig, prep: Preprocessing, x_fit: np.ndarray, n_cal: int, rng: np.random.Generator,
         verbose: bool | None, epoch_log: bool = True) -> tuple[keras.Model, dict[str, list[float]], int, int]:
    """Build and fit the model: ``(model, history, images fitted, images for early stopping)``.

    ``verbose``: Keras' progress bar (``None``: on a terminal only); without it, one log event per epoch
    unless ``epoch_log`` is False.
    """
    log = get_logger()
    if cfg.arch == "pca" and cfg.latent_dim > min(len(x_fit), math.prod(prep.input_shape)):
        raise UsageError(f"--arch pca keeps at most min(images fitted, pixels) = "
                         f"{min(len(x_fit), math.prod(prep.input_shape))} components; give --latent-dim at most "
                         f"that (it is {cfg.latent_dim}, 32 unless given), more images, or --arch auto, which "
                         "sizes PCA itself")
    model = build(cfg.arch, prep.input_shape, cfg.latent_dim)
    if cfg.arch == "pca":
        # A closed-form fit: every non-calibration image is fitted, nothing is needed for early stopping.
        if epoch_log:
            log.info("train.start", arch=cfg.arch, n_fit=len(x_fit), n_val=0, n_calibration=n_cal, denoise=False,
                     epochs=0)
        return model, _fit_pca_model(model, x_fit, cfg), len(x_fit), 0
    model.compile(optimizer=_optimizer(cfg), loss=cfg.loss)
    inputs = add_noise(x_fit, cfg.noise_factor, rng) if cfg.denoise else x_fit
    n_val = math.floor(len(x_fit) * cfg.validation_split) if len(x_fit) >= 10 else 0
    callbacks = []
    if n_val:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                       restore_best_weights=True))
    if verbose is None:
        verbose = sys.stdout.isatty()
    if not verbose and epoch_log:
        callbacks.append(_EpochLog(cfg.epochs))
    fit_x, fit_y = inputs[: len(inputs) - n_val], x_fit[: len(x_fit) - n_val]
    val = (inputs[len(inputs) - n_val :], x_fit[len(x_fit) - n_val :]) if n_val else None
    if epoch_log:
        log.info("train.start", arch=cfg.arch, n_fit=len(fit_x), n_val=n_val, n_calibration=n_cal,
                 denoise=cfg.denoise, epochs=cfg.epochs)
    history = model.fit(fit_x, fit_y, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True,
                        validation_data=val, callbacks=callbacks, verbose=1 if verbose else 0)
    return model, history.history, len(fit_x), n_val


def _score_state(cfg: TrainConfig, scorer: Scorer, x_fit: np.ndarray, x_sel: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], Choice | None]:
    """Rank the scores on the set-aside images (``--score auto``), then fit the chosen score's state."""
    x_state = x_fit if len(x_fit) <= MAX_STATE_IMAGES else x_fit[rng.choice(len(x_fit), MAX_STATE_IMAGES, False)]
    choice = None
    if x_sel is not None:
        damaged, _ = damage(x_sel, cfg.seed)
        choice = pick(choose_score(scorer.reconstruct, x_state, x_sel, damaged, _usable_scores(cfg, x_fit.shape[1:3]),
                                   x_all=x_fit), len(x_sel), cfg.arch, x_sel.shape[-1])
        choice.latent_dim = cfg.latent_dim if cfg.arch != "conv" else None
        cfg.score_fn = choice.score_fn
    if not lookup(cfg.score_fn).uses_reconstruction:  # learns from every fitted image (up to its own limit)
        return fit_state(cfg.score_fn, x_fit, x_fit), choice
    return fit_state(cfg.score_fn, x_state, scorer.reconstruct(x_state)), choice


def train_bundle(data: Dataset, cfg: TrainConfig, out: Path, *, overwrite: bool = False,
                 prep: Preprocessing = Preprocessing(), verbose: bool | None = None,
                 choices: dict[str, str] | None = None, on_start: Callable[[], None] = lambda: None) -> Path:
    """Train, calibrate and save a bundle.

    Args:
        data: Normal images.
        cfg: Training settings (``auto`` architecture and score are settled here, and stored).
        out: Bundle directory to write.
        overwrite: Replace an existing bundle.
        prep: Preprocessing the data was decoded with (stored in the bundle).
        verbose: Keras progress bar; ``None`` shows it only on a terminal.
        choices: How the input size and colour were chosen (stored in ``bundle.json``).
        on_start: Called once the images are known to be enough, before anything else is said or fitted (the
            CLI prints its choices then: a refusal is its one line).

    Raises:
        CalibrationError: too few images for an honest threshold at the target FPR.
    """
    cfg.check()
    log = get_logger()
    x, repeats = distinct(data.x)
    n = len(x)
    plan = calibration_plan(n, cfg, repeats)
    on_start()
    if repeats:
        log.warning("train.repeats_dropped", dropped=repeats, kept=len(x),
                    hint="an image repeated in the fitted and the calibration part scores as if unseen and makes "
                         "the threshold too low; each image is used once")
    log.info("train.calibration", method=plan.method, held_out=plan.reason)
    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    x_cal, x_fit = x[order[: plan.held_out]], x[order[plan.held_out :]]
    requested = {"arch": cfg.arch, "score": cfg.score_fn}
    x_fit, x_sel, choice = _resolve_auto(cfg, x_fit)
    if plan.folds and cfg.arch == "pca":  # a hold-out's own check comes with the fit
        fold_fit = n - math.ceil(n / plan.folds)
        if cfg.latent_dim > fold_fit:
            raise UsageError(f"--arch pca --latent-dim {cfg.latent_dim}: calibrating {n} images by cross-fitting "
                             f"fits each fold's PCA on {fold_fit} images, so it keeps at most {fold_fit} components; "
                             "give --latent-dim at most that, more images, or --arch auto")
    model, losses, n_fitted, n_val = _fit(cfg, prep, x_fit, plan.held_out or n, rng, verbose)
    state, score_choice = _score_state(cfg, Scorer(model, "mse"), x_fit[: len(x_fit) - n_val], x_sel, rng)
    choice = choice or score_choice
    if choice is not None:
        log.info("train.auto", choice=choice.summary())
    if plan.folds:  # every choice is settled: each fold fits the same architecture and score
        cal_scores = _cross_fit_scores(cfg, prep, x[order], plan.folds, rng)
    else:  # clean held-out images, for denoisers too: they also score what arrives
        cal_scores = Scorer(model, cfg.score_fn, state=state).score(x_cal)
    threshold, calibration = calibration_payload(cal_scores, cfg.target_fpr, provenance(data.source), plan.folds)
    choices = {**(choices or {}), **_auto_sentences(requested, cfg, choice)}
    meta = _meta(cfg, prep, data, out, choices, threshold, calibration, losses,
                 counts={"n_total": len(data), "n_repeats_dropped": repeats, "n_fit": n_fitted,
                         "n_validation": n_val, "n_calibration": len(cal_scores),
                         "n_held_out": plan.held_out, "n_selection": choice.n_selection if choice else 0,
                         "calibration_held_out": plan.reason})
    if choice is not None:
        meta["auto"] = choice.to_dict()
    path = save_bundle(_weights_only(model, cfg, prep), meta, Path(out), overwrite=overwrite, state=state)
    log.info("train.done", bundle=str(path), threshold=threshold, epochs_run=meta["training"]["epochs_run"],
             final_loss=meta["training"]["final_loss"])
    return path


def _cross_fit_scores(cfg: TrainConfig, prep: Preprocessing, x: np.ndarray, folds: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Out-of-fold scores: each fold of ``x`` scored by a model (and score state) fitted on the other folds."""
    log = get_logger()
    scores = np.empty(len(x), dtype=np.float64)
    for k, scored in enumerate(np.array_split(np.arange(len(x)), folds)):
        x_rest = np.delete(x, scored, axis=0)
        log.info("train.cross_fit", fold=k + 1, folds=folds, n_fit=len(x_rest), n_scored=len(scored))
        model, _, _, n_val = _fit(cfg, prep, x_rest, 0, rng, verbose=False, epoch_log=False)
        state, _ = _score_state(cfg, Scorer(model, "mse"), x_rest[: len(x_rest) - n_val], None, rng)
        scores[scored] = Scorer(model, cfg.score_fn, state=state).score(x[scored])
    return scores


def _auto_sentences(requested: dict[str, str], cfg: TrainConfig, choice: Choice | None) -> dict[str, str]:
    """How the architecture and score were chosen, one sentence each (printed, stored)."""
    out = {}
    for key, value in (("arch", cfg.arch if cfg.arch != "pca" else f"pca {cfg.latent_dim}"), ("score", cfg.score_fn)):
        if requested[key] != "auto":
            out[key] = f"given: {value}"
        elif key == "arch" and cfg.denoise:
            out[key] = f"auto: {value} (the seed's denoising network)"
        elif choice is not None:
            out[key] = f"auto: {value} ({choice.summary()})"
        else:
            out[key] = f"auto: {value} (too few images to set any aside for choosing)"
    return out


def _meta(cfg: TrainConfig, prep: Preprocessing, data: Dataset, out: Path, choices: dict[str, str],
          threshold: float, calibration: dict, losses: dict[str, list[float]], counts: dict) -> dict:
    """Every ``bundle.json`` field that training decides."""
    pca = cfg.arch == "pca"
    return {
        "name": cfg.name or Path(out).name,
        "arch": cfg.arch,
        "task": "denoise" if cfg.denoise else "detect",
        "input_shape": list(prep.input_shape),
        "latent_dim": cfg.latent_dim if cfg.arch != "conv" else None,
        "preprocessing": {**prep.to_dict(), **({"choices": choices} if choices else {})},
        "score_fn": cfg.score_fn,
        "threshold": threshold,
        "target_fpr": cfg.target_fpr,
        "calibration": calibration,
        "training": {
            "source": provenance(data.source),
            **counts,
            "epochs_max": 0 if pca else cfg.epochs,
            "epochs_run": 0 if pca else len(losses.get("loss", [])),
            "final_loss": float(losses["loss"][-1]),
            "final_val_loss": float(losses["val_loss"][-1]) if "val_loss" in losses else None,
            "best_val_loss": float(min(losses["val_loss"])) if "val_loss" in losses else None,
            "optimizer": "svd" if pca else cfg.optimizer,
            "learning_rate": None if pca else cfg.learning_rate,
            "loss": "mse" if pca else cfg.loss,
            "batch_size": cfg.batch_size,
            "denoise": cfg.denoise,
            "noise_factor": cfg.noise_factor if cfg.denoise else None,
            "seed": cfg.seed,
            **({"explained_variance": losses["explained_variance"][0]} if pca else {}),
        },
    }
