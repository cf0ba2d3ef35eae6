"""The command line: parse arguments, build settings once, run one verb, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from aemon import __version__
from aemon.errors import AemonError, ItemRejected, StartupError, UsageError
from aemon.logs import configure, get_logger, quiet_tensorflow
from aemon.settings import Settings, load_settings, unknown_env_names

__all__ = ["main", "build_parser"]

_VERBS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {}


def _verb(name: str):
    def register(fn):
        _VERBS[name] = fn
        return fn

    return register


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` owns every exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--config", type=Path, help="TOML settings file (default: $AEMON_CONFIG)")
    group.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    group.add_argument("--log-format", choices=["json", "console"], help="log line format (default: $AEMON_LOG_FORMAT)")
    group.add_argument("--log-level", help="lowest log level (default: $AEMON_LOG_LEVEL or INFO)")


def _add(sub, name: str, summary: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=summary, description=summary,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    return parser


def _train_parser(sub) -> None:
    """``aemon train`` and its options."""
    p = _add(sub, "train", "train an autoencoder on normal data, calibrate its threshold, write a bundle", """
        aemon train --data photos/ --out bundles/photos      # size, colour, model, score: auto
        aemon train --data sample:mnist --arch conv --out bundles/digits --epochs 10
        aemon train --data 'sample:mnist?digits=0,1' --arch dense --latent-dim 16 --out bundles/01
        aemon train --data mnist.npz?key=x_train --arch conv --denoise --out bundles/denoise
        aemon train --data sample:mnist --arch pca --latent-dim 32 --out bundles/pca
        aemon train --data photos/ --size 64x64 --color rgb --out bundles/photos
    """)
    p.add_argument("--data", required=True, metavar="SRC",
                   help="normal images: folder, .npy/.npz, sample:mnist, keras:mnist (options after ?)")
    p.add_argument("--arch", default="auto",
                   help="auto (chosen from the data: PCA sizes ranked on synthetic defects of set-aside normal "
                        "images), dense, deep, conv, convsmall (conv with a latent-dim bottleneck) or pca "
                        "(the linear baseline, fitted by SVD) (auto)")
    p.add_argument("--out", required=True, type=_path, metavar="BUNDLE_DIR", help="bundle directory to create")
    p.add_argument("--size", default="auto", type=_size, metavar="{auto,HxW}",
                   help="model input size; auto: the median image size, longer side at most 128 (auto)")
    p.add_argument("--color", default="auto", choices=["auto", "grayscale", "rgb"],
                   help="colour mode; auto: rgb if the images have colour (auto)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--denoise", action="store_true", help="train on noisy inputs against clean targets")
    p.add_argument("--noise-factor", type=float, default=None, help="Gaussian noise scale for --denoise (0.5)")
    p.add_argument("--epochs", type=int, default=20, help="most epochs; early stopping may end sooner (20)")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="code size of dense/deep/convsmall, components of pca (32; auto chooses its own)")
    p.add_argument("--target-fpr", type=_fpr, default=0.01, help="false-positive rate of the threshold (0.01)")
    p.add_argument("--batch-size", dest="train_batch_size", type=int, default=256,
                   help="training batch size (256)")
    p.add_argument("--optimizer", default="adam", help="adam, adadelta, rmsprop or sgd (adam)")
    p.add_argument("--learning-rate", type=float, help="optimizer learning rate (Keras default)")
    p.add_argument("--loss", default="binary_crossentropy", help="binary_crossentropy or mse")
    p.add_argument("--score", default="auto", dest="score_fn",
                   help="score function: auto (ranked like --arch auto), mse, bce, topk (mean of the worst 5%% "
                        "pixel errors), zmax (local: the most unusual place of the smoothed error map), "
                        "zmax+mean (zmax plus the distance to the mean normal image), bce+shape (bce plus "
                        "unusual amount, place and spread of intensity), nearest (distance of the image's "
                        "gradient histograms to the closest normal training image's), patches (the same region "
                        "by region: the farthest region from its closest match), zmax+nearest, zmax+patches, "
                        "zmax+mean+nearest or zmax+mean+patches (the sums) (auto)")
    p.add_argument("--calibration-split", type=float, default=0.1,
                   help="share held out for calibration (0.1); with too few images for that, as many as the target "
                        "FPR needs, or cross-fitting")
    p.add_argument("--validation-split", type=float, default=0.1, help="share of the rest for early stopping (0.1)")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--name", help="bundle name (default: the --out folder's name)")


def _calibrate_parser(sub) -> None:
    """``aemon calibrate`` and its options."""
    p = _add(sub, "calibrate", "recalibrate a bundle's threshold on new normal data", """
        aemon calibrate bundles/digits --data sample:mnist --target-fpr 0.05
        aemon calibrate bundles/digits --data normal_images/ --out bundles/digits-site2
        aemon calibrate mnist-detect --data my_digits/ --out bundles/digits   # a shipped bundle, copied
    """)
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--data", required=True, metavar="SRC", help="normal images to calibrate on")
    p.add_argument("--target-fpr", type=_fpr, help="new target false-positive rate (default: the bundle's)")
    p.add_argument("--out", type=_path, help="write a new bundle here instead of updating BUNDLE in place")


def _score_parser(sub) -> None:
    """``aemon score`` and its options."""
    p = _add(sub, "score", "score images or arrays once; one JSON record per item on stdout", """
        aemon score bundles/digits digit.png more_images/
        aemon score mnist-detect batch.npy          # the shipped bundle, by name
        aemon score mnist-detect 'sample:mnist?digits=7&limit=5'
        aemon score bundles/digits x.npz | jq 'select(.verdict == "anomaly")'
        aemon score mnist-detect photos/ --maps maps/     # where each anomalous image differs
    """)
    p.add_argument("paths", nargs="+", metavar="BUNDLE PATH",
                   help="a bundle folder (or a shipped name: mnist-detect), then images, arrays or folders")
    p.add_argument("--maps", type=_path, metavar="DIR",
                   help="write the anomaly map of each anomalous image into DIR (named in the record's 'map')")


def _denoise_parser(sub) -> None:
    """``aemon denoise`` and its options."""
    p = _add(sub, "denoise", "denoise images or arrays once; reconstructions go to --out", """
        aemon denoise bundles/denoise noisy.png more_noisy/ --out clean/
        aemon denoise mnist-denoise noisy.npy --out clean/     # the shipped denoise bundle, by name
    """)
    p.add_argument("paths", nargs="+", metavar="BUNDLE PATH",
                   help="a bundle folder (or a shipped name: mnist-denoise), then images, arrays or folders")
    p.add_argument("--out", required=True, type=_path, metavar="DIR",
                   help="folder for the results: PNG per image, same shape and dtype per array")


def _samples_parser(sub) -> None:
    """``aemon samples`` and its options."""
    p = _add(sub, "samples", "write a few real digit images (and one that is not) to try the daemon with", """
        aemon samples samples/ && cp samples/digit-3-3.png aemon-data/inbox/
    """)
    p.add_argument("out", type=Path, metavar="DIR", help="folder to write the PNGs into (made if missing)")
    p.add_argument("--count", type=int, default=5, help="how many digits (5)")


def _info_parser(sub) -> None:
    """``aemon info`` and its options."""
    p = _add(sub, "info", "print a bundle's metadata", """
        aemon info bundles/digits
        aemon info --json bundles/digits | jq .threshold
    """)
    p.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE", help="bundle (default: the default bundle)")
    p.add_argument("--json", action="store_true", help="machine-readable output (calibration scores omitted)")


def _evaluate_parser(sub) -> None:
    """``aemon evaluate`` and its options."""
    p = _add(sub, "evaluate", "detection quality of bundles: AUROC, AUPRC, FPR and TPR at the threshold", """
        aemon evaluate bundles/digits --normal 'sample:mnist?digits=0' --anomalous 'sample:mnist?digits=1'
        aemon evaluate bundles/a bundles/b --normal mnist.npz?key=x_test --anomalous fashion.npz?key=x_test --json
        aemon evaluate mnist-detect bundles/pca --normal mnist.npz?key=x_test --anomalous fashion.npz?key=x_test \\
            --report report/          # then open report/index.html
    """)
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE",
                   help="one or more bundle folders (or shipped names such as mnist-detect) to compare")
    p.add_argument("--normal", required=True, metavar="SRC", help="normal images")
    p.add_argument("--anomalous", required=True, metavar="SRC", help="anomalous images")
    p.add_argument("--report", type=_path, metavar="DIR",
                   help="also write PNG plots and an index.html showing them with the numbers into DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run_parser(sub) -> None:
    """``aemon run`` and its options."""
    p = _add(sub, "run", "the daemon: watch ROOT/inbox, score every item, route it to ok/, anomaly/ or rejected/", """
        aemon run --root /srv/aemon
        AEMON_ROOT=/srv/aemon AEMON_METRICS_PORT=9108 aemon run
        aemon run --config /etc/aemon.toml --mode denoise --polling
    """)
    # Strings, checked by the settings: Path("") would be ".", and an empty root never means the current folder.
    p.add_argument("--root", help="folder holding inbox/, ok/, anomaly/, rejected/ (default: $AEMON_ROOT)")
    p.add_argument("--model", type=Path, help="bundle directory (default: $AEMON_MODEL or the shipped bundle)")
    p.add_argument("--mode", choices=["detect", "denoise"], help="detect, or denoise as well (default: detect)")
    p.add_argument("--metrics-host", help="address of /metrics, /healthz, /readyz (default: 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="port of the HTTP endpoints (default: 9108)")
    p.add_argument("--batch-size", type=int, help="most items per model call (default: 64)")
    p.add_argument("--batch-wait-ms", type=float, help="longest wait for a batch to fill (default: 5)")
    p.add_argument("--settle-seconds", type=float, help="a file written in place is taken once unchanged this long (1)")
    p.add_argument("--polling", action=argparse.BooleanOptionalAction, default=None,
                   help="poll the inbox (network filesystems); --no-polling overrides AEMON_POLLING")
    p.add_argument("--workers", type=int, help="processes that decode, score and commit (default: the cores)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by the main process for its workers


def _size(text: str) -> str:
    """``auto`` or ``HxW``, sides 4 to 4096 (a usage error otherwise, exit 2)."""
    if text == "auto":
        return text
    try:
        sides = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) != 2 or min(sides) < 4 or max(sides) > 4096:
        raise argparse.ArgumentTypeError(f"must be auto or HxW (e.g. 64x64, sides 4 to 4096), not {text!r}")
    return text


def _fpr(text: str) -> float:
    """A false-positive rate strictly between 0 and 1 (a usage error otherwise, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {text!r}")
    return value


def _path(text: str) -> Path:
    """A path argument; an empty one (``--maps ""``) is refused, not taken as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every verb with its ``--help`` and examples)."""
    parser = _Parser(
        prog="aemon",
        description="Anomaly detection for images with Keras autoencoders: train, calibrate, score, watch a folder.",
        epilog="Run 'aemon VERB --help' for a verb's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"aemon {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    _train_parser(sub)
    _calibrate_parser(sub)
    _score_parser(sub)
    _denoise_parser(sub)
    _samples_parser(sub)
    _info_parser(sub)
    _evaluate_parser(sub)
    _run_parser(sub)
    return parser


def _check_out(out: Path, force: bool, src: str) -> None:
    """``--out`` may replace only a bundle (with ``--force``), and never be, hold or lie inside the training data.

    Raises:
        UsageError: what is in the way.
    """
    from aemon.bundle import is_bundle, is_shipped, replaceable
    from aemon.sources import local_path, refuse_output_inside

    local = local_path(src)
    if local is not None and (local.exists() or local.is_symlink()):
        data, dest = local.resolve(), out.resolve()
        if dest == data or dest in data.parents:
            raise UsageError(f"--out {out} is or holds the training data {src}; choose another --out")
    refuse_output_inside(out, [src], "--out")
    if is_shipped(out):
        raise UsageError(f"{out} is a bundle shipped with aemon; it is never replaced: choose another --out")
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(f"{out} already exists; choose another --out or pass --force to replace it")
        if out.is_symlink() or not is_bundle(out):
            raise UsageError(f"{out} is not a model bundle; --force replaces a bundle only: choose another --out")
        problem = replaceable(out)
        if problem:
            raise UsageError(f"{out} {problem}; --force replaces a bundle only: choose another --out")


@_verb("train")
def _train(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.images import is_array_name
    from aemon.sources import choose_input, load_source, local_path

    quiet_tensorflow()
    from aemon.models import CODED, check_fits
    from aemon.train import TrainConfig, train_bundle

    cfg = TrainConfig(
        arch=args.arch, epochs=args.epochs, batch_size=args.train_batch_size,
        latent_dim=32 if args.latent_dim is None else args.latent_dim,
        denoise=args.denoise, noise_factor=0.5 if args.noise_factor is None else args.noise_factor,
        target_fpr=args.target_fpr,
        calibration_split=args.calibration_split, validation_split=args.validation_split,
        patience=args.patience, optimizer=args.optimizer, learning_rate=args.learning_rate,
        loss=args.loss, score_fn=args.score_fn, seed=args.seed, name=args.name,
    )
    cfg.check()
    if args.noise_factor is not None and not cfg.denoise:
        raise UsageError("--noise-factor needs --denoise (it is the noise a denoiser learns to remove; "
                         "it was ignored)")
    if args.latent_dim is not None and cfg.arch == "auto":
        raise UsageError("--latent-dim needs a fixed --arch: --arch auto chooses its PCA size itself "
                         "(it was ignored)")
    if args.latent_dim is not None and cfg.arch not in CODED:
        raise UsageError(f"--arch {cfg.arch} has no --latent-dim: its code is fixed (the seed's network); "
                         f"use one of {', '.join(CODED)} to set a code size (it was ignored)")
    _check_out(args.out, args.force, args.data)
    prep, choices = choose_input(args.data, args.size, args.color)
    data = local_path(args.data)
    check_fits(cfg.arch, prep.input_shape, cfg.latent_dim, resizable=data is None or not is_array_name(data.name))
    data = load_source(args.data, prep)

    def say_choices() -> None:  # once the images are enough: too few is the one error line
        for what, why in choices.items():
            print(f"{what}: {why}", file=sys.stderr)

    path = train_bundle(data, cfg, args.out, overwrite=args.force, prep=prep, choices=choices, on_start=say_choices)
    from aemon.bundle import read_meta

    meta = read_meta(path)
    made = meta.preprocessing.get("choices", {})
    for what in ("arch", "score"):
        if what in made:
            print(f"{what}: {made[what]}", file=sys.stderr)
    if meta.training.get("n_repeats_dropped"):
        print(f"data: {meta.training['n_repeats_dropped']} exact repeats of other images dropped (each image is used "
              "once: a repeat in the fitted and the calibration part would make the threshold too low)",
              file=sys.stderr)
    print(f"calibration: {meta.training['calibration_held_out']}", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


@_verb("calibrate")
def _calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.bundle import find_bundle, is_shipped, load_bundle
    from aemon.evaluate import overlaps
    from aemon.recalibrate import recalibrate, refuse_taken_out
    from aemon.sources import load_source, refuse_output_in_bundles, refuse_output_inside, unlike_input

    found = find_bundle(args.bundle)
    if found is not None and is_shipped(found):  # a shipped bundle, by name or by its folder
        if args.out is None:
            raise UsageError(f"{args.bundle} is a bundle shipped with aemon: give --out DIR to write a recalibrated "
                             "copy (it is never changed in place)")
        args.bundle = found
    if args.out is not None:  # before the bundle and the data are loaded
        refuse_taken_out(args.out, args.bundle)
        refuse_output_inside(args.out, [args.data], "--out")
        refuse_output_in_bundles(args.out, [args.bundle], "--out")
    bundle = load_bundle(args.bundle)
    data = load_source(args.data, bundle.preprocessing)
    unlike = unlike_input(args.data, bundle.preprocessing)
    if unlike:
        get_logger().warning("calibrate.data_unlike", message=f"{unlike}; calibrate on images like those it will score")
    training = (bundle.meta.training or {}).get("source")
    if training and overlaps(args.data, training):
        get_logger().warning("calibrate.data_overlaps_training", data=args.data, training=training,
                             message="the model was fitted on these images: their scores are low and the threshold "
                                     "will be too low (more false alarms); calibrate on normal images it never saw")
    meta = recalibrate(bundle, data, args.target_fpr, args.out)
    where = args.out or args.bundle
    print(f"{where}: threshold {meta.threshold:.6g} at target FPR {meta.target_fpr} "
          f"from {meta.calibration.n} samples (revision {meta.revision})", file=sys.stderr)
    return 0


def _split_bundle_arg(paths: list[str], task: str = "detect") -> tuple[Path, list]:
    """``BUNDLE PATH...``: the bundle must come first and be one; no other argument may be a bundle."""
    from aemon.bundle import find_bundle, is_bundle

    verb = "score" if task == "detect" else task
    first, rest = paths[0], paths[1:]
    if any(not arg.strip() for arg in paths):  # an unset variable in a script: never the current folder
        raise UsageError(f"an empty argument to {verb}; usage: aemon {verb} BUNDLE PATH... (a folder is named, "
                         "never implied)")
    bundle = find_bundle(first)
    if bundle is None:
        what = "holds no bundle.json" if Path(first).is_dir() else "does not exist" if not Path(first).exists() \
            else "is not a bundle folder"
        raise UsageError(f"{first} {what}; usage: aemon {verb} BUNDLE PATH... (BUNDLE is a bundle folder or a "
                         "shipped name such as mnist-detect)")
    if not rest:
        raise UsageError(f"give at least one PATH to {verb} after the bundle")
    for arg in rest:  # a bundle folder, or a shipped bundle's name where no such path exists
        if is_bundle(Path(arg)) or (not os.path.lexists(arg) and find_bundle(arg) is not None):
            raise UsageError(f"{arg} is a model bundle, not an input; give one bundle, first: "
                             f"aemon {verb} BUNDLE PATH...")
    return bundle, [_score_target(p) for p in rest]


def _score_target(arg: str):
    """A path, or a named dataset (``sample:mnist``, ``keras:...``) kept as text."""
    from aemon.sources import is_named

    return arg if is_named(arg) else Path(arg)


@_verb("score")
def _score(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.bundle import load_bundle
    from aemon.pipeline import score_paths
    from aemon.sources import check_output_folder, make_output_folder

    bundle_path, paths = _split_bundle_arg(args.paths)
    bundle = load_bundle(bundle_path)
    if args.maps is not None:
        check_output_folder(args.maps, paths, "--maps", by_name=True, bundles=[bundle_path])
        make_output_folder(args.maps, "--maps")
    return _print_records(score_paths(bundle, paths, settings.limits, args.maps), "scored")


@_verb("denoise")
def _denoise(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.bundle import load_bundle
    from aemon.pipeline import denoise_paths
    from aemon.sources import check_output_folder, make_output_folder

    bundle_path, paths = _split_bundle_arg(args.paths, task="denoise")
    if any(isinstance(p, str) for p in paths):
        raise UsageError("denoise takes files and folders, not named datasets")
    check_output_folder(args.out, paths, "--out", by_name=True, bundles=[bundle_path])
    bundle = load_bundle(bundle_path)
    if bundle.meta.task != "denoise":
        raise UsageError(f"{bundle_path} is a {bundle.meta.task} bundle; denoise needs one trained with --denoise "
                         "(the shipped one is mnist-denoise)")
    make_output_folder(args.out, "--out")
    return _print_records(denoise_paths(bundle, paths, settings.limits, args.out), "denoised")


def _print_records(records: Iterator[dict], done: str) -> int:
    """One JSON line per record on stdout; exit status 1 (and one error line) if any was rejected."""
    from aemon.records import encode

    rejected = 0
    out = getattr(sys.stdout, "buffer", None)  # JSON lines are UTF-8 whatever the locale or PYTHONIOENCODING says
    sys.stdout.flush()
    for record in records:
        rejected += record.get("verdict") == "rejected"
        if out is not None:
            out.write(encode(record))
        else:
            sys.stdout.write(encode(record).decode())
    (out or sys.stdout).flush()
    if rejected:
        print(f"Error: {rejected} item(s) could not be {done} (see their 'reason' and 'error')", file=sys.stderr)
        return 1
    return 0


def _info_lines(path: Path, meta) -> Iterator[str]:
    t = meta.training
    yield f"bundle        {path}"
    yield f"name          {meta.name}"
    yield f"version       {meta.version}"
    yield f"task          {meta.task}"
    yield f"arch          {meta.arch}" + (f" (latent {meta.latent_dim})" if meta.latent_dim else "")
    yield f"input         {'x'.join(map(str, meta.input_shape))}, {meta.preprocessing.get('color_mode')}"
    yield f"score         {meta.score_fn}" + (f" (state: {meta.score_state_file})" if meta.score_state_file else "")
    for what, why in meta.preprocessing.get("choices", {}).items():
        yield f"{'chosen ' + what:<14}{why}"
    yield f"threshold     {meta.threshold:.6g} (target FPR {meta.target_fpr})"
    folds = getattr(meta.calibration, "folds", None)
    how = f", out-of-fold scores of {folds} fold models" if getattr(meta.calibration, "method", None) == "cross_fit" \
        and folds else ""
    yield (f"calibration   {meta.calibration.n} samples from {meta.calibration.source}{how} at "
           f"{meta.calibration.created_at}")
    epochs = f"{t.get('epochs_run')}/{t.get('epochs_max')} epochs"
    yield f"training      {t.get('source')}: {t.get('n_fit')} fitted, {epochs}"
    yield f"final loss    {t.get('final_loss')} (validation {t.get('final_val_loss')})"
    yield f"created       {meta.created_at} with aemon {meta.aemon_version}, keras {meta.keras_version}"
    yield f"model sha256  {meta.model_sha256}"


@_verb("samples")
def _samples(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.sources import write_samples

    if not 1 <= args.count <= 1000:
        raise UsageError("--count must be between 1 and 1000")
    try:
        written = write_samples(args.out, args.count)
    except FileExistsError as exc:
        raise UsageError(f"{exc.filename} exists; choose an empty folder") from None
    except OSError as exc:
        raise AemonError(f"the samples could not be written into {args.out}: {exc.strerror or exc}") from exc
    for path in written:
        print(path)
    return 0


@_verb("info")
def _info(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.bundle import default_bundle_path, find_bundle, load_bundle

    if args.bundle is not None and not args.bundle.exists():
        args.bundle = find_bundle(args.bundle) or args.bundle  # a shipped bundle, by name
    path = args.bundle or settings.model or default_bundle_path("detect")
    meta = load_bundle(path).meta  # every check score and the daemon make: info never shows a broken bundle as fine
    if args.json:
        data = meta.model_dump(mode="json")
        data["calibration"].pop("scores", None)
        data["version"] = meta.version
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(_info_lines(path, meta)))
    return 0


@_verb("evaluate")
def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.evaluate import evaluate_command

    return evaluate_command(args, settings)


@_verb("run")
def _run(args: argparse.Namespace, settings: Settings) -> int:
    from aemon.confine import skip_unused_imports

    # A SIGHUP or SIGTERM before the daemon's handlers are in place (TensorFlow takes seconds to start)
    # would end the process: both are held until then. Worker processes inherit the mask, so they hold
    # them from their first instruction.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})

    quiet_tensorflow()
    skip_unused_imports()
    if args.worker:
        from aemon.workers import die_with_parent

        index, count, parent, *beat = (int(part) for part in args.worker.split(":"))
        beat_fd = beat[0] if beat else None  # a main process of the version before has no heartbeat pipe
        die_with_parent(parent)
        configure(settings.log_format, settings.log_level, stream=sys.stdout, worker=index)
        from aemon.daemon import Daemon

        return Daemon(settings, worker=index, of=count, beat_fd=beat_fd).run()
    shared = None
    if settings.workers > 1 and Path(settings.root).is_dir():
        from aemon.workers import metrics_dir

        # Before prometheus_client is imported: every process then writes its values to files.
        try:
            shared = metrics_dir(Path(os.path.abspath(settings.root)))
        except OSError as exc:
            raise StartupError.unusable_root(settings.root, exc) from exc
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.fspath(shared)
        # Every process keeps a TensorFlow pool over all the cores: a big array is one process's
        # work, and with a pool of cores/workers threads it scored at half speed; small batches
        # from every process at once measured the same either way.
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    from aemon.daemon import Daemon

    try:
        return Daemon(settings, workers=settings.workers - 1,
                      reread=lambda: load_settings(args.config, **_settings_flags(args))).run()
    finally:
        if shared is not None:
            from aemon.workers import remove_shared

            remove_shared(shared)


def _settings_flags(args: argparse.Namespace) -> dict:
    names = ("log_format", "log_level", "root", "model", "mode", "metrics_host", "metrics_port",
             "batch_size", "batch_wait_ms", "settle_seconds", "polling", "workers")
    return {name: getattr(args, name, None) for name in names}


def _trailing_paths(extra: list[str]) -> tuple[list[str], list[str]]:
    """Arguments argparse left over after an option: ``(paths, unknown)``. Before a ``--`` anything that
    starts with ``-`` is an unknown option; after it, everything is a path."""
    before, after = (extra[: extra.index("--")], extra[extra.index("--") + 1:]) if "--" in extra else (extra, [])
    unknown = [arg for arg in before if arg.startswith("-")]
    return ([], unknown) if unknown else ([*before, *after], [])


#: Verbs whose results are printed on standard output (the others write files, and log on stderr).
_RESULTS_ON_STDOUT = ("score", "denoise", "info", "evaluate", "samples")


def _error_prefix(argv: list[str]) -> str:
    """``Error: ``, or ``Error (worker N): `` in a worker process of ``aemon run`` (its lines share the
    daemon's output, so each names who failed)."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--worker=") else \
            argv[i + 1] if arg == "--worker" and i + 1 < len(argv) else None
        if value and value.partition(":")[0].isdigit():
            return f"Error (worker {value.partition(':')[0]}): "
    return "Error: "


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    error = _error_prefix(argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # paths after an option: score B --maps DIR x.png (and after '--', paths starting with '-')
            paths, unknown = _trailing_paths(extra) if getattr(args, "paths", None) is not None else ([], extra)
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            args.paths += paths
        if args.verb is None:
            parser.print_help()
            return 2
        if sys.stdout is None and args.verb in _RESULTS_ON_STDOUT and not getattr(args, "report", None):
            raise UsageError(f"standard output is closed; aemon {args.verb} writes its results there "
                             "(redirect it to a file or /dev/null instead)")  # started with >&-: all would be lost
        quiet_tensorflow()  # before any verb may import TensorFlow: no start-up banners on any output
        settings = load_settings(args.config, **_settings_flags(args))
        log_stream = sys.stdout if args.verb == "run" and sys.stdout is not None else sys.stderr
        configure(settings.log_format, settings.log_level, stream=log_stream)
        for name in unknown_env_names():
            get_logger().warning("settings.unknown_variable", name=name,
                                 hint="no setting has this name; see the README's settings table")
        return _VERBS[args.verb](args, settings)
    except (AemonError, ItemRejected) as exc:
        if debug:
            traceback.print_exc()
        print(f"{error}{exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`aemon score ... | head -1`): stop quietly, as a pipe's writer does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:  # numpy's (e.g. a --size far beyond the images) is a MemoryError
        if debug:
            traceback.print_exc()
        print(f"{error}out of memory; use a smaller --size, fewer images (?limit=N) or a smaller model",
              file=sys.stderr)
        return 1
    except OSError as exc:  # an output the filesystem refuses: read-only, below a file, full
        if debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{error}{exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{error}interrupted", file=sys.stderr)
        return 130
