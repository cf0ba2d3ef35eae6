"""``--arch auto`` and ``--score auto``: choose from the normal training images alone.

A share of the training images is set aside (never fitted). Each of them is damaged once by every
family of :mod:`aemon.synthetic`; each candidate is fitted on the rest and ranked by how well its
score separates the set-aside images from their damaged copies (AUROC). Real anomalies are never
seen. Ties go to the earlier candidate (fewer components, simpler score).

Candidates for ``--arch auto`` are linear (PCA) models of :data:`AUTO_COMPONENTS` components,
each with every score of :data:`AUTO_SCORES`: measured on real defect images (README, "Detection
quality"), no autoencoder trained in minutes on two cores beat PCA once the score was local, and
PCA fits in seconds. With a given architecture, ``--score auto`` ranks the scores only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aemon.logs import get_logger
from aemon.models import fit_pca, pca_reconstruct
from aemon.ranking import roc_auc
from aemon.scoring import fit_state, lookup, reconstruction_error
from aemon.synthetic import FAMILIES, damage, families_for

__all__ = ["AUTO_COMPONENTS", "AUTO_SCORES", "Choice", "choose_pca", "choose_score", "split_for_selection"]

#: Components tried by ``--arch auto`` (those below the number of fitted images).
AUTO_COMPONENTS = (32, 64, 128, 256)
#: Scores tried by ``--score auto``.
AUTO_SCORES = ("mse", "topk", "zmax", "zmax+mean", "nearest", "patches", "zmax+nearest", "zmax+mean+nearest",
               "zmax+patches", "zmax+mean+patches")
#: Share of the training images set aside to rank candidates (at least :data:`MIN_SELECTION`, at most
#: :data:`MAX_SELECTION`: each is damaged once per family).
SELECTION_SHARE = 0.2
MIN_SELECTION = 10
MAX_SELECTION = 500
#: Most fitted images a candidate's local score learns its statistics from while ranking.
MAX_STATE_WHILE_RANKING = 2000
#: Below this synthetic AUROC the best candidate is reported as weak.
WEAK_AUROC = 0.6


@dataclass
class Choice:
    """What ``auto`` picked, why, and every candidate's synthetic AUROC."""

    arch: str
    latent_dim: int | None
    score_fn: str
    synthetic_auroc: float
    n_selection: int
    table: list[dict] = field(default_factory=list)
    #: The damage families the candidates were ranked on.
    families: list[str] = field(default_factory=lambda: list(FAMILIES))

    def summary(self) -> str:
        """One line for the terminal and the bundle."""
        model = f"{self.arch} {self.latent_dim}" if self.arch == "pca" else self.arch
        return (f"{model} scored by {self.score_fn}: synthetic AUROC {self.synthetic_auroc:.3f}, the best of "
                f"{len(self.table)} candidates on {self.n_selection} set-aside normal images and their damaged "
                f"copies ({', '.join(self.families)})")

    def to_dict(self) -> dict:
        return {"arch": self.arch, "latent_dim": self.latent_dim, "score_fn": self.score_fn,
                "synthetic_auroc": round(self.synthetic_auroc, 4), "n_selection": self.n_selection,
                "families": self.families, "candidates": self.table}


def split_for_selection(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, selection)`` of ``n`` training images; selection is empty when too few."""
    order = np.random.default_rng(seed + 1).permutation(n)
    n_sel = min(MAX_SELECTION, max(MIN_SELECTION, round(n * SELECTION_SHARE)))
    if n - n_sel < MIN_SELECTION:
        return order, order[:0]
    return order[n_sel:], order[:n_sel]


def _auroc(normal: np.ndarray, damaged: np.ndarray) -> float:
    scores = np.concatenate([normal, damaged])
    if not np.isfinite(scores).all():
        return 0.0
    return roc_auc(np.r_[np.zeros(len(normal)), np.ones(len(damaged))], scores)


def choose_score(reconstruct: Callable[[np.ndarray], np.ndarray], x_fit: np.ndarray, x_sel: np.ndarray,
                 x_damaged: np.ndarray, scores: tuple[str, ...] = AUTO_SCORES,
                 r_fit: np.ndarray | None = None, x_all: np.ndarray | None = None) -> list[dict]:
    """Synthetic AUROC of every score for one fitted model (``reconstruct``), in ``scores`` order.

    ``r_fit``: the reconstructions of ``x_fit`` that local scores learn from (default: ``reconstruct``'s).
    ``x_all``: every fitted image (default ``x_fit``), which a score of the image alone learns from, as the
    bundle's will (``nearest`` keeps them as its neighbours).
    """
    r_fit = reconstruct(x_fit) if r_fit is None else r_fit
    r_sel, r_dmg = reconstruct(x_sel), reconstruct(x_damaged)
    rows = []
    for kind in scores:
        if lookup(kind).uses_reconstruction or x_all is None:
            state = fit_state(kind, x_fit, r_fit)
        else:
            state = fit_state(kind, x_all, x_all)  # its fit does not read the reconstructions
        auroc = _auroc(reconstruction_error(x_sel, r_sel, kind, state),
                       reconstruction_error(x_damaged, r_dmg, kind, state))
        rows.append({"score_fn": kind, "synthetic_auroc": round(auroc, 4)})
    return rows


def pick(rows: list[dict], n_selection: int, arch: str, channels: int = 3) -> Choice:
    """The first row with the highest synthetic AUROC (a weak best is logged as a warning)."""
    best = max(rows, key=lambda row: row["synthetic_auroc"])  # max keeps the first of equals
    if best["synthetic_auroc"] < WEAK_AUROC:
        get_logger().warning("train.auto_weak", synthetic_auroc=best["synthetic_auroc"],
                             hint="no candidate tells the set-aside images from their damaged copies well: "
                                  "more (or larger) normal images help")
    return Choice(arch=arch, latent_dim=best.get("latent_dim"), score_fn=best["score_fn"],
                  synthetic_auroc=best["synthetic_auroc"], n_selection=n_selection, table=rows,
                  families=families_for(channels))


def choose_pca(x: np.ndarray, seed: int, scores: tuple[str, ...] = AUTO_SCORES) -> Choice | None:
    """The PCA size and score with the best synthetic AUROC, or None when too few images to set any aside."""
    fit_idx, sel_idx = split_for_selection(len(x), seed)
    if not len(sel_idx):
        return None
    x_fit, x_sel = x[fit_idx], x[sel_idx]
    x_damaged, _ = damage(x_sel, seed)
    sizes = [k for k in AUTO_COMPONENTS if k < len(x_fit) and k < x[0].size] or [min(len(x_fit), x[0].size) - 1]
    mean, comps, _ = fit_pca(x_fit, max(sizes))
    x_state = x_fit[:MAX_STATE_WHILE_RANKING]
    rows = []
    for k in sizes:
        def reconstruct(images: np.ndarray, k: int = k) -> np.ndarray:
            return pca_reconstruct(images, mean, comps[:k])

        # A score of the image alone is the same with every model: ranked with the first (the smallest) only.
        ranked = [kind for kind in scores if k == sizes[0] or lookup(kind).uses_reconstruction]
        rows += [{"arch": "pca", "latent_dim": k, **row}
                 for row in choose_score(reconstruct, x_state, x_sel, x_damaged, tuple(ranked), x_all=x_fit)]
    return pick(rows, len(x_sel), "pca", x.shape[-1])
