"""The evaluation report: PNG plots and an ``index.html`` that shows them with the numbers.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display), each
at a fixed pixel size (:data:`FIGURE_PIXELS`). The HTML links only files in the same folder, so
the report opens from disk and can be copied or archived as one folder.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from aemon.errors import UsageError
from aemon.fsio import fsync_dir, is_temp_name, remove_stale_temp_files, temp_name, utc_now, write_with
from aemon.logs import get_logger
from aemon.maps import strengths, tinted
from aemon.ranking import precision_recall_curve, roc_curve
from aemon.sources import local_path

__all__ = ["DPI", "FIGURE_PIXELS", "INDEX", "ReportFile", "write_report"]

#: Resolution every figure is saved at.
DPI = 100
#: Width and height in pixels of each kind of figure.
FIGURE_PIXELS: dict[str, tuple[int, int]] = {
    "roc": (640, 480),
    "pr": (640, 480),
    "hist": (640, 400),
    "reconstructions": (800, 480),
    "errors": (800, 330),
    "latent": (560, 480),
}
#: Name of the HTML page.
INDEX = "index.html"
#: The title of every report's index.html: how an earlier report is known.
_TITLE = "<title>aemon evaluation</title>"
#: Names of the files a report writes (those of an earlier report in the same folder are removed first).
_REPORT_FILE = re.compile(r"(roc|pr)\.png|[0-9]+-[A-Za-z0-9_.-]*-(hist|reconstructions|errors|latent)\.png|"
                          + re.escape(INDEX))

_NORMAL_COLOUR = "tab:blue"
_ANOMALOUS_COLOUR = "tab:red"


@dataclass
class ReportFile:
    """One figure of the report."""

    #: File name inside the report folder.
    name: str
    #: One of :data:`FIGURE_PIXELS`.
    kind: str
    #: Caption shown under the figure.
    caption: str


def _figure(kind: str) -> Figure:
    width, height = FIGURE_PIXELS[kind]
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    # Written beside the destination and renamed, so an open index.html never shows half a PNG.
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:40] or "bundle"


def _image(x: np.ndarray) -> np.ndarray:
    """One model input ``(H, W, C)`` as something ``imshow`` draws (grey for one channel)."""
    return x[..., 0] if x.shape[-1] == 1 else x


def _roc(path: Path, results) -> None:
    fig = _figure("roc")
    ax = fig.add_subplot()
    for r in results:
        fpr, tpr, _ = roc_curve(*_labelled(r))
        line = ax.plot(fpr, tpr, label=f"{r.quality.bundle} (AUROC {r.quality.auroc:.4f})")[0]
        ax.plot([r.quality.fpr], [r.quality.tpr], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlabel="false-positive rate (normal flagged)", ylabel="true-positive rate (anomalies flagged)",
           title="ROC (dots: each bundle's threshold)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def _labelled(r) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = anomalous) and scores of one bundle's result, normal first."""
    return (np.r_[np.zeros(len(r.normal_scores)), np.ones(len(r.anomalous_scores))],
            np.r_[r.normal_scores, r.anomalous_scores])


def _pr(path: Path, results) -> None:
    fig = _figure("pr")
    ax = fig.add_subplot()
    for r in results:
        precision, recall, _ = precision_recall_curve(*_labelled(r))
        line = ax.plot(recall, precision, label=f"{r.quality.bundle} (AUPRC {r.quality.auprc:.4f})")[0]
        flagged_anomalous = r.quality.tpr * len(r.anomalous_scores)
        flagged = flagged_anomalous + r.quality.fpr * len(r.normal_scores)
        if flagged:
            ax.plot([r.quality.tpr], [flagged_anomalous / flagged], "o", color=line.get_color())
    prevalence = len(results[0].anomalous_scores) / (len(results[0].anomalous_scores) + len(results[0].normal_scores))
    ax.axhline(prevalence, linestyle=":", color="grey", label=f"chance ({prevalence:.2f})")
    ax.set(xlabel="recall (anomalies flagged)", ylabel="precision (flagged that are anomalies)",
           title="Precision-recall (dots: each bundle's threshold)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize="small")
    _save(fig, path)


def _hist(path: Path, r) -> None:
    fig = _figure("hist")
    ax = fig.add_subplot()
    both = np.r_[r.normal_scores, r.anomalous_scores]
    low, high = float(both.min()), float(both.max())
    log = low > 0 and high / low > 100
    if log:
        bins = np.geomspace(low, high, 60)
        ax.set_xscale("log")
    else:
        bins = np.linspace(low, high if high > low else low + 1, 60)
    # Each set's bars sum to 1, so sets of different sizes compare (log bins stay honest too).
    for scores, colour, label in ((r.normal_scores, _NORMAL_COLOUR, "normal"),
                                  (r.anomalous_scores, _ANOMALOUS_COLOUR, "anomalous")):
        ax.hist(scores, bins=bins, alpha=0.6, weights=np.full(len(scores), 1 / len(scores)), color=colour,
                label=f"{label} (n={len(scores)})")
    ax.axvline(r.quality.threshold, color="black", linestyle="--", label=f"threshold {r.quality.threshold:.4g}")
    score_fn = r.bundle.meta.score_fn
    ax.set(xlabel=f"score ({score_fn}{', log scale' if log else ''})", ylabel="share of the set per bin",
           title=f"{r.quality.bundle}: scores of normal and anomalous images")
    ax.legend(fontsize="small")
    _save(fig, path)


def _pick(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def _reconstructions(path: Path, r, normal: np.ndarray, anomalous: np.ndarray, n: int) -> None:
    """Originals above reconstructions, for normal and for anomalous samples."""
    rng = np.random.default_rng(0)
    sets = [("normal", normal[_pick(len(normal), n, rng)]), ("anomalous", anomalous[_pick(len(anomalous), n, rng)])]
    fig = _figure("reconstructions")
    grid = fig.add_gridspec(4, n)
    for block, (label, x) in enumerate(sets):
        recon = r.bundle.scorer.reconstruct(x)
        for row, (images, what) in enumerate(((x, "original"), (recon, "reconstruction"))):
            for col in range(n):
                ax = fig.add_subplot(grid[2 * block + row, col])
                ax.set_axis_off()
                if col < len(images):
                    ax.imshow(_image(images[col]), cmap="gray", vmin=0, vmax=1)
                if col == 0:
                    ax.set_title(f"{label}: {what}", loc="left", fontsize="small")
    fig.suptitle(f"{r.quality.bundle}: originals above, reconstructions below", fontsize="medium")
    _save(fig, path)


def _errors(path: Path, r, normal: np.ndarray, anomalous: np.ndarray, n: int) -> None:
    """The highest-scoring images: originals, reconstructions and their anomaly maps (as the daemon draws them)."""
    scores = np.r_[r.normal_scores, r.anomalous_scores]
    top = np.argsort(scores)[::-1][:n]
    x = np.stack([normal[i] if i < len(normal) else anomalous[i - len(normal)] for i in top])
    recon = r.bundle.scorer.reconstruct(x)
    tint = strengths(r.bundle, x, recon)
    fig = _figure("errors")
    grid = fig.add_gridspec(3, n)
    for col in range(n):
        for row, (image, kw) in enumerate((
            (_image(x[col]) if col < len(x) else None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
            (_image(recon[col]) if col < len(x) else None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
            (tinted(x[col], tint[col]) if col < len(x) else None, {}),
        )):
            ax = fig.add_subplot(grid[row, col])
            ax.set_axis_off()
            if image is None:
                continue
            ax.imshow(image, **kw)
            if row == 0:
                kind = "normal" if top[col] < len(normal) else "anomalous"
                ax.set_title(f"{kind}\n{scores[top[col]]:.3g}", fontsize="x-small")
    fig.suptitle(f"{r.quality.bundle}: top-scoring images (original, reconstruction, anomaly map)",
                 fontsize="medium")
    _save(fig, path)


def _principal_plane(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Rows of ``x`` projected on their first two principal axes, and the share of the variance kept."""
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float(np.sum(s**2))
    return centred @ vt[:2].T, float(np.sum(s[:2] ** 2) / total) if total else 0.0


def _latent(path: Path, r, normal: np.ndarray, anomalous: np.ndarray, n: int) -> str:
    """Codes of normal and anomalous samples projected to 2-D by PCA; returns the caption."""
    rng = np.random.default_rng(1)
    xn, xa = normal[_pick(len(normal), n, rng)], anomalous[_pick(len(anomalous), n, rng)]
    codes_n, codes_a = r.bundle.scorer.encode(xn), r.bundle.scorer.encode(xa)
    both = np.concatenate([codes_n, codes_a]).astype(np.float64)
    size = both.shape[1]
    if size >= 2 and len(both) >= 2:
        points, explained = _principal_plane(both)
        how = f"PCA of the {size}-number codes ({explained:.0%} of their variance)"
    else:
        points = np.c_[both[:, :1], np.zeros(len(both))]
        how = "the 1-number code"
    fig = _figure("latent")
    ax = fig.add_subplot()
    ax.scatter(points[: len(codes_n), 0], points[: len(codes_n), 1], s=6, alpha=0.5, color=_NORMAL_COLOUR,
               label=f"normal (n={len(codes_n)})")
    ax.scatter(points[len(codes_n) :, 0], points[len(codes_n) :, 1], s=6, alpha=0.5, color=_ANOMALOUS_COLOUR,
               label=f"anomalous (n={len(codes_a)})")
    ax.set(xlabel="component 1", ylabel="component 2", title=f"{r.quality.bundle}: latent space, {how}")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small", markerscale=3)
    _save(fig, path)
    return f"Encoder outputs of normal and anomalous samples: {how}."


def _fmt(value: float) -> str:
    return f"{value:.4f}"


#: The page's style sheet.
_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.85em; max-width: 640px; }
img { max-width: 100%; border: 1px solid #eee; }
.warn { color: #a40; }
</style>"""


def _html(results, files: dict[int, list[ReportFile]], shared: list[ReportFile], normal, anomalous) -> str:
    esc = html.escape
    rows = []
    for r in results:
        q, meta = r.quality, r.bundle.meta
        mark = " *" if q.warnings else ""
        rows.append(
            "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
                q.bundle + mark, meta.arch, meta.score_fn, meta.version, _fmt(q.auroc), _fmt(q.auprc), _fmt(q.fpr),
                _fmt(q.tpr), f"{q.threshold:.5g}", meta.target_fpr, q.n_normal, q.n_anomalous)) + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("bundle", "arch", "score", "version", "AUROC", "AUPRC", "FPR", "TPR",
                                             "threshold", "target FPR", "normal", "anomalous"))
    warnings = [w for r in results for w in r.quality.warnings]
    notes = "".join(f"<p class=warn>* {esc(w)}</p>" for w in warnings)

    def figure(f: ReportFile) -> str:
        return (f'<figure><a href="{esc(f.name)}"><img src="{esc(f.name)}" alt="{esc(f.caption)}"></a>'
                f"<figcaption>{esc(f.caption)}</figcaption></figure>")

    sections = [f"<h2>All bundles</h2><div class=row>{''.join(figure(f) for f in shared)}</div>"]
    for i, r in enumerate(results, 1):
        meta = r.bundle.meta
        prov = meta.training or {}
        sections.append(
            f"<h2>{esc(r.quality.bundle)}</h2>"
            f"<p>{esc(str(r.bundle.path))} &middot; arch {esc(meta.arch)} &middot; version {esc(meta.version)} "
            f"&middot; trained on {esc(str(prov.get('source')))} ({esc(str(prov.get('n_fit')))} images) "
            f"&middot; calibrated on {esc(meta.calibration.source)} ({meta.calibration.n} images)</p>"
            f"<div class=row>{''.join(figure(f) for f in files[i])}</div>"
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{_TITLE}
{_STYLE}
</head>
<body>
<h1>aemon evaluation</h1>
<p>Normal: {esc(normal.source)} ({len(normal)} images) &middot; anomalous: {esc(anomalous.source)}
({len(anomalous)} images) &middot; written {esc(utc_now())}</p>
<p>Anomalous is the positive class. FPR and TPR are the shares of normal and of anomalous images
scored above each bundle's own threshold.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
{notes}
{chr(10).join(sections)}
</body>
</html>
"""


def check_report_folder(out: Path, sources: Iterable[str] = ()) -> None:
    """A report may go into a new or empty folder, or over an earlier report: it replaces files named like
    its own (``roc.png``, ``index.html``...), so a folder of other files is refused, and so is a source read
    from inside the folder.

    Raises:
        UsageError: ``out`` holds files and no earlier report, holds a source, or lies below a file.
    """
    for above in Path(os.path.abspath(out)).parents:  # a file on the way: the folder could never be made
        if above.exists() and not above.is_dir():
            raise UsageError(f"--report {out}: {above} is a file, not a folder")
    folder = Path(out).resolve()
    for src in sources:
        local = local_path(str(src))
        if local is not None and folder in local.resolve().parents:
            raise UsageError(f"--report {out}: the source {src} is inside the report folder, where a report "
                             "replaces its own files; move the data out or choose another folder")
    if not out.is_dir() or not any(not is_temp_name(entry.name, _TEMP_SUFFIXES) for entry in out.iterdir()):
        return
    try:
        earlier = _TITLE in (out / INDEX).read_text(errors="replace")
    except OSError:
        earlier = False
    if not earlier:
        raise UsageError(f"--report {out} holds files and no earlier aemon report; a report replaces files "
                         "named like its own (roc.png, index.html, ...): choose a new or empty folder")


#: The suffixes of the temp names a report draws its figures and page under (:func:`aemon.fsio.temp_name`).
_TEMP_SUFFIXES = (".png", ".html")


#: The figures an index.html shows and links.
_LISTED = re.compile(r'(?:src|href)="([^"/:]+)"')


def _earlier_files(out: Path) -> set[str]:
    """The files of an earlier report in ``out``: those its index.html lists (never a file of the user's that
    only looks like one)."""
    try:
        page = (out / INDEX).read_text(errors="replace")
    except OSError:
        return set()
    if _TITLE not in page:
        return set()
    return {name for name in _LISTED.findall(page) if _REPORT_FILE.fullmatch(name)}


def _regular_or_missing(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def _planned_files(results) -> tuple[list[ReportFile], dict[int, list[ReportFile]]]:
    """The report's figures: those shared by every bundle, and each bundle's (by its position, from 1)."""
    shared = [
        ReportFile("roc.png", "roc", "ROC curves of every bundle on one axis; dots mark each bundle's threshold."),
        ReportFile("pr.png", "pr", "Precision-recall curves of every bundle; dots mark each bundle's threshold."),
    ]
    files: dict[int, list[ReportFile]] = {}
    for i, r in enumerate(results, 1):
        stem = f"{i}-{_slug(r.quality.bundle)}"
        files[i] = [
            ReportFile(f"{stem}-hist.png", "hist", "Score histograms of normal and anomalous images; the dashed line "
                       "is the threshold."),
            ReportFile(f"{stem}-reconstructions.png", "reconstructions", "Random normal and anomalous samples: "
                       "originals above, reconstructions below."),
            ReportFile(f"{stem}-errors.png", "errors", "The highest-scoring images: original, reconstruction and "
                       "anomaly map, red where the image is unusual, on the bundle's fixed scale (label and score "
                       "above each)."),
        ]
        if r.bundle.scorer.has_encoder:
            files[i].append(ReportFile(f"{stem}-latent.png", "latent", "Latent space."))
    return shared, files


def write_report(out: Path, results, normal, anomalous, *, n_examples: int = 8, n_top: int = 8,
                 n_latent: int = 2000) -> Path:
    """Write the PNG plots and ``index.html`` for evaluated bundles into ``out``.

    Args:
        out: Report folder (created if missing; the files of an earlier report are removed, others kept).
        results: :class:`aemon.evaluate.Evaluation` per bundle.
        normal: The normal :class:`aemon.sources.Dataset` the results were scored on.
        anomalous: The anomalous :class:`aemon.sources.Dataset`.
        n_examples: Normal and anomalous samples shown with their reconstructions.
        n_top: Highest-scoring images shown with per-pixel error heatmaps.
        n_latent: Most samples of each set projected in the latent plot.

    Returns:
        The path of ``index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, _TEMP_SUFFIXES)  # left by a report killed while drawing
    shared, files = _planned_files(results)
    planned = [f.name for f in shared] + [f.name for i in files for f in files[i]] + [INDEX]
    for name in planned:
        if not _regular_or_missing(out / name):
            raise UsageError(f"--report {out}: {name} there is not a file (a folder or a link); move it away")
    # Every figure is drawn under a temp name first: the earlier report stays whole until the new one is
    # complete, and a failure (a full disk, ^C) leaves nothing half-made.
    temps = {name: temp_name(out, ".png") for name in planned[:-1]}
    temps[INDEX] = temp_name(out, ".html")
    try:
        _draw(temps, results, (shared, files), (normal, anomalous), (n_examples, n_top, n_latent))
        for name in _earlier_files(out) - set(planned):  # plots of bundles no longer evaluated
            if _regular_or_missing(out / name):
                (out / name).unlink(missing_ok=True)
        for name in planned:  # the index last: it shows the new figures only once they are all in place
            os.replace(temps[name], out / name)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(out)
    return out / INDEX


def _draw(temps: dict[str, str], results, planned: tuple[list[ReportFile], dict[int, list[ReportFile]]],
          sources: tuple, counts: tuple[int, int, int]) -> None:
    """Draw every figure and the page into their temp names (``temps``), logging progress per figure."""
    (shared, files), (normal, anomalous), (n_examples, n_top, n_latent) = planned, sources, counts
    log, total, done = get_logger(), len(temps) - 1, 0

    def progress(name: str) -> None:
        nonlocal done
        done += 1
        log.info("report.figure", file=name, step=done, of=total)

    _roc(Path(temps[shared[0].name]), results)
    progress(shared[0].name)
    _pr(Path(temps[shared[1].name]), results)
    progress(shared[1].name)
    draw = {"hist": lambda path, r: _hist(path, r),
            "reconstructions": lambda path, r: _reconstructions(path, r, normal.x, anomalous.x, n_examples),
            "errors": lambda path, r: _errors(path, r, normal.x, anomalous.x, n_top),
            "latent": lambda path, r: _latent(path, r, normal.x, anomalous.x, n_latent)}
    for i, r in enumerate(results, 1):
        for f in files[i]:
            caption = draw[f.kind](Path(temps[f.name]), r)
            if f.kind == "latent":
                f.caption = caption
            progress(f.name)
    page = _html(results, files, shared, normal, anomalous).encode()
    with open(temps[INDEX], "xb") as fp:
        fp.write(page)
        fp.flush()
        os.fsync(fp.fileno())
