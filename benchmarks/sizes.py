"""Which policy for images of another size: resize, keep aspect and pad, or crop (run on demand, not in tests).

For each elpv module type, a bundle trained with aemon's defaults on ``defect=0&split=train``
scores the test cells (``defect=0&split=test`` normal, ``defect=1`` anomalous) as they are, then
as they would come from another camera (the same view at another resolution and pixel aspect,
each side 0.6-1.5x) and with another framing (a crop of 75-100 % of each side), each brought to
the bundle's size by one of three policies. Prints AUROC and the FPR at the bundle's threshold.

Usage: python benchmarks/sizes.py   (needs the elpv-dataset package; about a minute)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from aemon.bundle import load_bundle
from aemon.logs import configure
from aemon.ranking import roc_auc
from aemon.sources import Preprocessing, choose_input, load_source
from aemon.train import TrainConfig, train_bundle

SIDE = 300  # elpv cells


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _to_bundle(img: np.ndarray, policy: str, side: int) -> np.ndarray:
    """``img`` brought to ``side``x``side`` by ``policy``."""
    h, w = img.shape
    if policy == "resize":
        return _resize(img, side, side)
    if policy == "pad":
        scale = side / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        border = np.r_[img[0], img[-1], img[:, 0], img[:, -1]]
        out = np.full((side, side), np.median(border), np.uint8)
        y, x = (side - nh) // 2, (side - nw) // 2
        out[y:y + nh, x:x + nw] = _resize(img, nh, nw)
        return out
    scale = side / min(h, w)  # crop
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    y, x = (nh - side) // 2, (nw - side) // 2
    return _resize(img, nh, nw)[y:y + side, x:x + side]


def _arrives(img: np.ndarray, scenario: str, rng: np.random.Generator) -> np.ndarray:
    """The cell as another camera would deliver it."""
    if scenario == "as trained":
        return img
    if scenario == "other resolution and pixel aspect":
        return _resize(img, int(SIDE * rng.uniform(0.6, 1.5)), int(SIDE * rng.uniform(0.6, 1.5)))
    ch, cw = int(SIDE * rng.uniform(0.75, 1)), int(SIDE * rng.uniform(0.75, 1))  # other framing
    y, x = rng.integers(0, SIDE - ch + 1), rng.integers(0, SIDE - cw + 1)
    return img[y:y + ch, x:x + cw]


def main() -> None:
    configure("console", "WARNING")
    rng = np.random.default_rng(0)
    raw = Preprocessing(color_mode="grayscale", size=(SIDE, SIDE))
    tmp = Path(tempfile.mkdtemp())
    print("| type | arrives | resize (aemon's policy) | keep aspect, pad | keep aspect, crop |")
    print("| --- | --- | --- | --- | --- |")
    for kind in ("mono", "poly"):
        src = f"sample:elpv?type={kind}&defect=0&split=train"
        prep, _ = choose_input(src)
        bundle = load_bundle(train_bundle(load_source(src, prep), TrainConfig(), tmp / kind, prep=prep, verbose=False))
        side = prep.size[0]
        normal = (load_source(f"sample:elpv?type={kind}&defect=0&split=test", raw).x[..., 0] * 255).astype(np.uint8)
        anomalous = (load_source(f"sample:elpv?type={kind}&defect=1", raw).x[..., 0] * 255).astype(np.uint8)
        for scenario in ("as trained", "other resolution and pixel aspect", "other framing"):
            got_n = [_arrives(img, scenario, rng) for img in normal]
            got_a = [_arrives(img, scenario, rng) for img in anomalous]
            cells = []
            for policy in ("resize", "pad", "crop"):
                s_n, s_a = (bundle.score(np.stack([_to_bundle(i, policy, side) for i in got])[..., None] / 255.0)
                            for got in (got_n, got_a))
                auroc = roc_auc(np.r_[np.zeros(len(s_n)), np.ones(len(s_a))], np.r_[s_n, s_a])
                cells.append(f"{auroc:.3f} (FPR {np.mean(s_n > bundle.threshold):.3f})")
            print(f"| {kind} | {scenario} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
