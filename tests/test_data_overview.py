"""Notebook 01's helpers and figures on the tiny mirror: status tables, previews, example tasks, plots."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hmlib.config import load_config  # noqa: E402
from hmlib.data import cache_status, example_task, load_datasets, preview, source_status, summary  # noqa: E402
from hmlib.plots.data import plot_class_counts, plot_polarity, plot_preprocessing, plot_task  # noqa: E402

NAMES = ("mnist", "math_shapes")


def data_cfg():
    return load_config("smoke", overrides={"data": {"max_images_per_split": 48}}).data


def test_status_tables_before_and_after_loading(tiny_mirror):
    cfg = data_cfg()
    before = source_status(cfg, NAMES)
    assert [r["next load from"] for r in before] == ["local copy", "local copy"]
    assert not any(r["cached"] for r in cache_status(NAMES))
    sets = load_datasets(cfg, NAMES, progress=False)
    assert [r["next load from"] for r in source_status(cfg, NAMES)] == ["cache", "cache"]
    rows = cache_status(NAMES)
    assert all(r["cached"] and r["images"] == 48 for r in rows)
    assert {r["fingerprint"] for r in rows} == {s.fingerprint for by_split in sets.values() for s in by_split.values()}
    assert [(r["dataset"], r["split"]) for r in summary(sets)] == [(n, s) for n in NAMES for s in ("train", "test")]


def test_preview_matches_the_cache_and_plots(tiny_mirror):
    cfg = data_cfg()
    shown = preview("mnist", cfg, num_images=5, num_polarity=30)
    assert len(shown.raw) == 5 and shown.processed.shape == (5, 28, 28)
    assert len(set(shown.labels.tolist())) == 5  # one image per class
    assert shown.inverted_fraction == 0.0  # the tiny mirror has bright ink on dark
    sets = load_datasets(cfg, ["mnist"], progress=False)
    task = example_task(sets["mnist"]["train"], 4, 256)  # shrunk to what the smallest class can fill
    assert task.indices.shape == (1, 4 * int(sets["mnist"]["train"].class_counts().min()))
    for fig in (plot_preprocessing(shown), plot_polarity({"mnist": shown.inverted_fraction}),
                plot_class_counts(sets), plot_task(sets["mnist"]["train"], task)):
        assert isinstance(fig, Figure)
    np.testing.assert_array_equal(shown.processed, shown.kept)  # nothing to invert here


def test_an_image_row_is_one_image_with_gaps_and_refuses_mixed_sizes():
    import matplotlib.pyplot as plt

    from hmlib.plots import show_image_row

    fig, ax = plt.subplots()
    centres = show_image_row(ax, [np.full((4, 3), 10, np.uint8), None, np.full((4, 3), 200, np.uint8)], gap=1)
    assert centres == [1.0, 5.0, 9.0]  # each image's middle column, for tick labels
    shown = ax.get_images()[0].get_array()
    assert len(ax.get_images()) == 1 and shown.shape == (4, 3 * 3 + 2)
    assert (shown[:, :3] == 10).all() and shown.mask[:, 3:8].all() and (shown[:, 8:] == 200).all()
    for bad in ([np.zeros((4, 3)), np.zeros((5, 3))], [None], []):
        with pytest.raises(ValueError, match="2-D images of one size"):
            show_image_row(ax, bad)
    plt.close(fig)
