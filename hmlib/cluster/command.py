"""``hmlib cluster PATH --k K``: cluster an unlabeled image collection with a trained model and write the results.

Order of work: check the arguments, claim the output folder (writable, empty unless ``--overwrite``, locked
against a concurrent run: :func:`~hmlib.cluster.outputs.claim_out_dir`), resolve the checkpoint, decode the
images, fit the estimator, then write ``assignments.csv``, ``clusters.html`` and ``summary.json``. Bad input
stops with one line ``hmlib cluster: error: ...`` on stderr (exit status 2) before anything is written.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hmlib.artifacts import ArtifactError, save_checkpoint
from hmlib.cli import add_device_option
from hmlib.cluster.decode import one_line
from hmlib.cluster.images import ClusterInputError, ImageCollection, input_kind, load_images
from hmlib.cluster.outputs import (ASSIGNMENTS, CONTACT_SHEET, SUMMARY, build_summary, claim_out_dir,
                                   default_out_dir, write_assignments, write_summary)
from hmlib.cluster.sheet import write_contact_sheet
from hmlib.config import ConfigError, TaskConfig, configure_runtime, resolve_device
from hmlib.errors import StorageError
from hmlib.results import cluster_accuracy_note

MAX_PRINTED = 20  # skipped files printed one per line; the rest are in summary.json
ADAPTED_BACKBONE = "backbone_adapted.pt"  # written by --adapt beside the outputs
DEFAULT_K_MAX = 10

DESCRIPTION = """Cluster the images at PATH into K groups with a meta-trained model, without labels.
PATH is a folder of image files (searched recursively; any format Pillow reads), a parquet folder in the
Hugging Face schema (<name>/{train,test}.parquet, or one .parquet file) or a hub id 'org/name'.
Writes assignments.csv (file, cluster, confidence), clusters.html (a contact sheet) and summary.json to --out.
Unreadable images are skipped and listed; files that are not images are ignored."""


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib cluster``; the handler is ``args.func(args)``."""
    parser = subparsers.add_parser("cluster", help="cluster an unlabeled image folder, parquet folder or hub dataset",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH", help="image folder, parquet folder / file, or hub id 'org/name'")
    parser.add_argument("--k", type=_k_value, required=True, metavar="K",
                        help="number of clusters, or 'auto' to choose it without labels (the K in 2..--k-max, and "
                             "below the number of images, whose clusters have the highest silhouette on the "
                             "embedding; needs at least 3 images); at least 2, at most the number of images; any K "
                             "works (the "
                             f"prototypes come from the images), the default meta-training uses K = {TaskConfig().num_classes}; "
                             f"{cluster_accuracy_note()}".replace("%", "%%"))  # argparse expands % in help
    parser.add_argument("--k-max", type=int, default=None, metavar="KMAX",
                        help=f"largest K tried by --k auto, at least 2 (default {DEFAULT_K_MAX})")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="model checkpoint (default: the pipeline's zero-shot checkpoint)")
    parser.add_argument("--adapt", action="store_true",
                        help="first adapt the backbone to these unlabeled images (transductive; SCAN-style, a minute or "
                             "so on a CPU) and save it beside the outputs as backbone_adapted.pt; needs at least "
                             "1,000 images (below that it says so and clusters without adapting); the adapted "
                             "backbone is not used where the label-free gate declines it (transductive.gate: by "
                             "default, where the backbone already recognises the images as its training classes; "
                             "that rule is asked first, so nothing is trained or saved there; it says so)")
    parser.add_argument("--no-gate", action="store_true",
                        help="with --adapt: use the adapted backbone even where the gate declines it")
    parser.add_argument("--steps", type=int, metavar="S",
                        help="adaptation steps at test time, 0 for none (default: adapt.test_steps of the "
                             "checkpoint's profile)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: results/cluster/<name of PATH>/ under the artifact home)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {ASSIGNMENTS}, {CONTACT_SHEET} and {SUMMARY} in an existing --out")
    parser.add_argument("--split", metavar="NAME",
                        help="parquet / hub split to cluster (default: test if present, else train)")
    parser.add_argument("--limit", type=int, metavar="N", help="cluster only the first N images (in sorted order)")
    parser.add_argument("--per-cluster", type=int, default=12, metavar="M",
                        help="thumbnails per row of the contact sheet (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_option(parser, "the clustering", default="auto: a GPU where there is one")
    parser.set_defaults(func=run_cluster_command)
    return parser


def run_cluster_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib cluster``: 0 on success, 2 with a one-line message on bad input."""
    try:
        return _cluster(args)
    except (ClusterInputError, StorageError) as err:  # bad input, or an --out that cannot be written
        print(f"hmlib cluster: error: {err}", file=sys.stderr)
        return 2


def _k_value(text: str) -> int | str:
    """``--k``: an integer or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _check_arguments(args: argparse.Namespace) -> None:
    if not str(args.path).strip():
        raise ClusterInputError("PATH '' names nothing; give an image folder, a parquet folder / file or a hub id")
    if args.k_max is not None and args.k_max < 2:
        raise ClusterInputError(f"--k-max must be at least 2 (got {args.k_max})")
    if args.k == "auto":
        args.k_max = DEFAULT_K_MAX if args.k_max is None else args.k_max
    elif args.k_max is not None:
        raise ClusterInputError(f"--k-max applies to --k auto only; with --k {args.k} leave it out")
    elif args.k < 2:
        raise ClusterInputError(f"--k must be at least 2 (got {args.k})")
    args.no_gate = getattr(args, "no_gate", False)  # Namespaces built by callers may leave it out
    if args.no_gate and not args.adapt:
        raise ClusterInputError("--no-gate applies to --adapt only; add --adapt or leave --no-gate out")
    if args.steps is not None and args.steps < 0:
        raise ClusterInputError(f"--steps must be 0 or more (got {args.steps})")
    if args.limit is not None and args.limit < 1:
        raise ClusterInputError(f"--limit must be at least 1 (got {args.limit})")
    if args.per_cluster < 1:
        raise ClusterInputError(f"--per-cluster must be at least 1 (got {args.per_cluster})")
    if args.split is not None and not args.split.strip():
        raise ClusterInputError("--split '' names no split; give one (e.g. --split test) or leave --split out")
    if args.checkpoint is not None and not str(args.checkpoint).strip():
        raise ClusterInputError("--checkpoint '' names no file; give a checkpoint or leave it out for the default")
    try:  # a GPU this machine lacks fails here, before any image is read
        resolve_device(getattr(args, "device", None) or "auto")
    except ConfigError as err:
        raise ClusterInputError(f"--device: {err}") from None


def _estimator_api() -> Any:
    """The model side, imported only when a run needs it."""
    try:
        return importlib.import_module("hmlib.cluster.estimator")
    except ImportError as err:
        raise ClusterInputError(f"the clustering model is not available ({one_line(err)})") from err


def _checkpoint(api: Any, given: str | Path | None) -> Path:
    if given is not None:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise ClusterInputError(f"checkpoint not found: {path}")
        return path
    try:
        return Path(api.default_checkpoint())
    except (FileNotFoundError, ArtifactError) as err:
        raise ClusterInputError(str(err).strip().splitlines()[0] if str(err).strip() else one_line(err)) from err


def _fit(api: Any, checkpoint: Path, k: int | str, steps: int | None, images: np.ndarray, k_max: int = 10, *,
         adapt_out: Path | None = None, gate: bool = True, progress: bool = True, device: str | None = None) -> Any:
    """The fitted estimator (K chosen from the data when ``k`` is 'auto'; the backbone first adapted to the images
    when ``adapt_out`` is given, and saved there); a checkpoint or input it refuses becomes a one-line error."""
    try:
        model = api.HyperClusterer.from_checkpoint(checkpoint, n_clusters=2 if k == "auto" else k, num_steps=steps,
                                                   device=device or "auto")
    except (FileNotFoundError, ArtifactError, ValueError) as err:
        raise ClusterInputError(f"cannot use checkpoint {checkpoint}: {one_line(err)}") from err
    configure_runtime(model.bundle.cfg)  # deterministic kernels and the checkpoint's threads, as in the notebooks
    if adapt_out is not None:
        if len(images) < api.MIN_ADAPT_IMAGES:
            print(f"not adapting the backbone: --adapt needs at least {api.MIN_ADAPT_IMAGES:,} images (nearest "
                  f"neighbours in a sparse set are mostly other classes); these are {len(images):,}. Clustering "
                  "with the backbone as trained.")
        else:
            adapted = model.adapt_to(images, gate=gate, progress=progress)
            if adapted is not None:  # None: declined before training (the gate read the backbone only)
                save_checkpoint(adapt_out, adapted["state"], adapted["meta"])
                print(f"adapted the backbone to {model.adapted_['images']:,} images in "
                      f"{model.adapted_['seconds']:.0f} s ({model.adapted_['epochs']} epochs); saved {adapt_out}")
            if not model.adapted_["used"]:
                from hmlib.backbone.transductive import gate_message  # torch: imported once it is needed
                print(gate_message("--adapt", model.adapted_["gate"]))
    try:
        if k == "auto":  # a silhouette needs 2..n-1 clusters: K = n (one image each) cannot be scored
            model.select_n_clusters(images, range(2, min(k_max, len(images) - 1) + 1))
        else:
            model.fit(images)
    except ValueError as err:
        raise ClusterInputError(f"the model cannot cluster these images: {one_line(err)}") from err
    return model


def _results(model: Any, count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, confidence)`` from the fitted estimator, checked against its documented contract."""
    labels, confidence = np.asarray(model.labels_), np.asarray(model.confidence_, dtype=np.float64)
    in_range = count == 0 or (labels.dtype.kind in "iu" and 0 <= labels.min() and labels.max() < k)
    if labels.shape != (count,) or not in_range:
        raise RuntimeError(f"estimator labels_ must be ({count},) integers in 0..{k - 1}; got {labels.shape} "
                           f"{labels.dtype}")
    if confidence.shape != (count,) or not np.all((confidence >= 0) & (confidence <= 1)):
        raise RuntimeError(f"estimator confidence_ must be ({count},) values in [0, 1]; got {confidence.shape}")
    return labels.astype(np.int64), confidence


def _print_skipped(collection: ImageCollection) -> None:
    if collection.skipped:
        print(f"skipped {len(collection.skipped)} unreadable file(s):")
        for name, reason in collection.skipped[:MAX_PRINTED]:
            print(f"  {name}: {reason}")
        if len(collection.skipped) > MAX_PRINTED:
            print(f"  ... and {len(collection.skipped) - MAX_PRINTED} more (listed in {SUMMARY})")
    if collection.ignored:
        print(f"ignored {len(collection.ignored)} file(s) that are not images (listed in {SUMMARY})")


def _cluster(args: argparse.Namespace) -> int:
    _check_arguments(args)
    input_kind(args.path)  # a PATH that does not exist fails here, before any other check
    with claim_out_dir(args.out if args.out is not None else default_out_dir(args.path), args.overwrite) as out:
        return _cluster_into(args, out)


def _cluster_into(args: argparse.Namespace, out: Path) -> int:
    """The run proper, writing into the claimed (checked, locked) folder ``out``."""
    api = _estimator_api()
    checkpoint = _checkpoint(api, args.checkpoint)
    collection = load_images(args.path, progress=not args.quiet, limit=args.limit, split=args.split)
    _print_skipped(collection)
    if args.k != "auto" and args.k > len(collection):
        raise ClusterInputError(f"--k {args.k} is larger than the number of images ({len(collection)}) at "
                                f"{collection.location}")
    if args.k == "auto" and len(collection) < 3:
        raise ClusterInputError(f"--k auto needs at least 3 images (a silhouette compares 2..n-1 clusters); "
                                f"{collection.location} has {len(collection)}; pass --k instead")
    (out / ADAPTED_BACKBONE).unlink(missing_ok=True)  # an earlier run's (--overwrite): never left beside new outputs
    model = _fit(api, checkpoint, args.k, args.steps, collection.images, args.k_max,
                 adapt_out=out / ADAPTED_BACKBONE if args.adapt else None,
                 gate=not args.no_gate, progress=not args.quiet,
                 device=getattr(args, "device", None))
    if args.k == "auto":
        args.k = int(model.n_clusters)
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in model.k_scores_.items())
        print(f"chose K={args.k} without labels (silhouette on the embedding per K: {scores})")
    labels, confidence = _results(model, len(collection), args.k)
    summary = build_summary(collection, model, input_path=args.path, k=args.k, requested_steps=args.steps,
                            labels=labels, confidence=confidence)
    if args.adapt and "adapted_backbone" not in summary["estimator"]:  # asked for, declined for the set's size
        summary["estimator"]["adapted_backbone"] = {"used": False, "reason": f"--adapt needs at least "
                                                    f"{api.MIN_ADAPT_IMAGES:,} images; these are {len(collection):,}"}
    write_assignments(out / ASSIGNMENTS, collection.names, labels, confidence)
    write_contact_sheet(out / CONTACT_SHEET, collection.images, labels, confidence, names=collection.names,
                        n_clusters=args.k, per_cluster=args.per_cluster, summary=summary,
                        title=f"hmlib cluster: {collection.location} (K={args.k})")
    write_summary(out / SUMMARY, summary)
    print(f"clustered {len(collection)} images from {collection.location} into K={args.k} clusters "
          f"(checkpoint {summary['checkpoint']}, {summary['num_steps']} steps)")
    for row in summary["clusters"]:
        mean = f"mean confidence {row['mean_confidence']:.2f}" if row["size"] else "empty"
        print(f"  cluster {row['cluster']:>3}: {row['size']:>7} images ({row['share']:6.1%})  {mean}")
    print(f"wrote {out / ASSIGNMENTS}\n      {out / CONTACT_SHEET}\n      {out / SUMMARY}")
    return 0
