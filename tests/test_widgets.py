"""The interactive explorer's logic (no browser): settings in, adapted predictions and figures out."""
from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hmlib.config import AdaptConfig, HyperConfig  # noqa: E402
from hmlib.data import sample_tasks  # noqa: E402
from hmlib.hypernet import HyperNet, TaskInputs, target_forward  # noqa: E402
from hmlib.metrics import clustering_accuracy  # noqa: E402
from hmlib.widgets import AdaptationExplorer, TaskSource, explorer_widget, pca_2d  # noqa: E402

NUM_IMAGES, LATENT_DIM, K, N, TASKS, MAX_STEPS = 300, 4, 3, 24, 3, 5
HYPER = HyperConfig(embed_dim=8, head_hidden=16, target_hidden=(8,), num_seeds=2, num_heads=2)


def _source(seed: int) -> TaskSource:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, NUM_IMAGES)
    mu = (rng.normal(size=(NUM_IMAGES, LATENT_DIM)) + labels[:, None]).astype(np.float32)
    logvar = (rng.normal(size=(NUM_IMAGES, LATENT_DIM)) * 0.1 - 1).astype(np.float32)
    return TaskSource(mu, logvar, sample_tasks(labels, TASKS, K, N, seed=seed))


@pytest.fixture
def explorer() -> AdaptationExplorer:
    torch.manual_seed(0)
    hypernet = HyperNet(HYPER, LATENT_DIM, K)
    adapt = AdaptConfig(inner_loss="infomax", num_inner_steps=2, inner_lr=0.5)
    return AdaptationExplorer(hypernet, {"a": _source(0), "b": _source(1)}, adapt, max_steps=MAX_STEPS)


def test_initial_state_matches_a_direct_run(explorer):
    state = explorer.state
    assert (state.dataset, state.task, state.num_steps, state.inner_lr, state.inner_loss) == ("a", 0, 2, 0.5, "infomax")
    assert state.accuracy.shape == (MAX_STEPS + 1,)
    source = explorer.sources["a"]
    idx, labels = source.suite.indices[0], source.suite.labels[0]
    inputs = TaskInputs.from_arrays(source.mu[idx], source.logvar[idx])
    # Zero steps = the generated classifier itself: compare with the target net applied directly.
    with torch.no_grad():
        params = explorer.hypernet(explorer.hypernet.context(inputs))
        pred0 = target_forward(params, explorer.hypernet.target_features(inputs)).argmax(-1).numpy()
    assert state.accuracy[0] == pytest.approx(clustering_accuracy(pred0, labels, K))
    assert state.current_accuracy == pytest.approx(clustering_accuracy(state.pred, labels, K))
    # pred is relabelled by the best matching, so plain agreement equals clustering accuracy.
    assert np.mean(state.pred == labels) == pytest.approx(state.current_accuracy)
    assert state.confusion.sum() == N and np.trace(state.confusion) == round(state.current_accuracy * N)
    assert state.embedding.shape == (N, 2)


def test_changing_lr_changes_adapted_outputs_but_not_step_zero(explorer):
    before = explorer.set(num_steps=MAX_STEPS, inner_lr=0.01)
    after = explorer.set(inner_lr=5.0)
    assert after.accuracy[0] == before.accuracy[0]
    assert after.seconds > 0.0  # a new lr re-runs the inner loop
    # With lr 5 the classifier moves; compare the raw curves' predictions through the cache.
    pred_small = explorer._cache[("a", 0, 0.01, "infomax")][0]
    pred_large = explorer._cache[("a", 0, 5.0, "infomax")][0]
    assert np.array_equal(pred_small[0], pred_large[0])
    assert not np.array_equal(pred_small[-1], pred_large[-1])


def test_steps_slider_reuses_the_cached_run(explorer):
    explorer.set(num_steps=0)
    state = explorer.set(num_steps=MAX_STEPS)
    assert state.seconds == 0.0  # served from the cache: only the view changes
    assert state.num_steps == MAX_STEPS
    assert state.current_accuracy == pytest.approx(state.accuracy[MAX_STEPS])


def test_loss_task_and_dataset_pickers(explorer):
    infomax = explorer.set(num_steps=MAX_STEPS, inner_lr=2.0)
    geometry = explorer.set(inner_loss="geometry")
    assert geometry.inner_loss == "geometry"
    assert not np.array_equal(explorer._cache[("a", 0, 2.0, "infomax")][0][-1],
                              explorer._cache[("a", 0, 2.0, "geometry")][0][-1])
    other_task = explorer.set(task=1)
    assert not np.array_equal(other_task.labels, geometry.labels) or not np.array_equal(
        other_task.classes, geometry.classes) or not np.allclose(other_task.embedding, geometry.embedding)
    moved = explorer.set(dataset="b")
    assert (moved.dataset, moved.task) == ("b", 0)  # a new dataset starts at its first task
    assert np.array_equal(moved.classes, explorer.sources["b"].suite.classes[0])
    assert infomax.inner_loss == "infomax"


@pytest.mark.parametrize("change, message", [
    ({"dataset": "nope"}, "unknown dataset"), ({"task": TASKS}, "out of range"),
    ({"num_steps": MAX_STEPS + 1}, "num_steps"), ({"inner_lr": 0.0}, "inner_lr"), ({"inner_loss": "l2"}, "inner_loss"),
])
def test_invalid_settings_raise_and_change_nothing(explorer, change, message):
    before = (explorer.dataset, explorer.task, explorer.num_steps, explorer.inner_lr, explorer.inner_loss)
    with pytest.raises(ValueError, match=message):
        explorer.set(**change)
    assert (explorer.dataset, explorer.task, explorer.num_steps, explorer.inner_lr, explorer.inner_loss) == before


def test_step_grid_and_curves(explorer):
    states = explorer.step_grid([0, 1, 3, MAX_STEPS + 10])
    assert [s.num_steps for s in states] == [0, 1, 3]  # steps beyond max_steps are skipped
    curves = explorer.curves(inner_lrs=[0.1, 1.0], inner_losses=["entropy", "geometry"])
    assert list(curves) == ["lr=0.1", "lr=1", "entropy", "geometry"]
    assert all(c.shape == (MAX_STEPS + 1,) for c in curves.values())
    assert (explorer.inner_lr, explorer.inner_loss) == (0.5, "infomax")  # settings restored


def test_pca_2d_orders_directions_by_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * np.array([5.0, 1.0, 0.1])
    proj = pca_2d(x)
    assert proj.shape == (200, 2)
    assert proj[:, 0].var() > proj[:, 1].var() > 0
    assert np.allclose(np.abs(proj[:, 0]), np.abs(x[:, 0] - x[:, 0].mean()), atol=0.5)


def test_widget_controls_drive_the_explorer(explorer):
    box = explorer_widget(explorer)
    controls = {c.description: c for row in box.children[:2] for c in row.children}
    assert set(controls) == {"dataset", "task", "inner loss", "inner steps", "inner lr"}
    controls["inner steps"].value = 4
    assert explorer.num_steps == 4
    controls["inner loss"].value = "entropy"
    assert explorer.inner_loss == "entropy"
    controls["dataset"].value = "b"
    assert explorer.dataset == "b" and controls["task"].max == TASKS - 1
    controls["inner lr"].value = 1.0
    assert explorer.inner_lr == pytest.approx(1.0)
    shown = box.children[2].value
    assert shown[:8] == b"\x89PNG\r\n\x1a\n"  # the figure, re-rendered on each change
    controls["task"].value = 1
    assert explorer.task == 1 and box.children[2].value != shown
    plt.close("all")


def test_explorer_state_figures(explorer):
    from hmlib.plots.ablations import plot_explorer_state, plot_step_multiples, plot_task_curves

    figures = [plot_explorer_state(explorer.state), plot_step_multiples(explorer.step_grid([0, 2, 4])),
               plot_task_curves(explorer.curves(inner_lrs=[0.1, 1.0]))]
    assert [len(f.axes) >= 1 for f in figures] == [True] * 3
    assert len(figures[1].axes) == 6
    plt.close("all")


def test_zero_max_steps_and_bad_construction():
    torch.manual_seed(0)
    hypernet = HyperNet(HYPER, LATENT_DIM, K)
    explorer = AdaptationExplorer(hypernet, {"a": _source(0)}, dataclasses.replace(AdaptConfig(), num_inner_steps=3),
                                  max_steps=0)
    assert explorer.state.accuracy.shape == (1,) and explorer.num_steps == 0
    with pytest.raises(ValueError, match="at least one dataset"):
        AdaptationExplorer(hypernet, {}, AdaptConfig())
    source = _source(0)
    with pytest.raises(ValueError, match="only"):
        TaskSource(source.mu[:5], source.logvar[:5], source.suite)


def test_explorer_figure_updates_in_place(explorer):
    from hmlib.plots.ablations import ExplorerFigure

    view = ExplorerFigure(explorer.set(num_steps=0))
    first = view.png()
    state = explorer.set(num_steps=MAX_STEPS, inner_lr=3.0, task=2)
    view.update(state)
    x, y = view.curve.get_data()
    np.testing.assert_allclose(y, 100 * state.accuracy)
    assert [t.get_text() for t in view.ax_cm.texts] == [str(v) for v in state.confusion.ravel()]
    np.testing.assert_allclose(view.points.get_offsets(), state.embedding)
    assert len(view.rings.get_offsets()) == int((state.pred != state.labels).sum())
    assert view.png() != first and view.png()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="classes"):
        view.update(dataclasses.replace(state, classes=np.arange(K + 1)))
    plt.close("all")
