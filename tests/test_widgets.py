"""The interactive explorer's logic (no browser): settings in, adapted predictions and figures out."""
from __future__ import annotations

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from hmlib.artifacts import MissingArtifactError
from hmlib.config import AdaptConfig, HyperConfig
from hmlib.data import sample_tasks
from hmlib.features import pca_2d
from hmlib.hyper import losses
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.losses import task_accuracy
from hmlib.metrics import clustering_accuracy
from hmlib.plots.ablations import ExplorerFigure, plot_explorer_state, plot_step_multiples, plot_task_curves
from hmlib.widgets import AdaptationExplorer, TaskSource, explorer_widget
from tinyprotocol import train_home, use_home

NUM_IMAGES, CONTEXT_DIM, FEATURE_DIM, K, N, TASKS, MAX_STEPS = 300, 6, 4, 3, 24, 3, 5
HYPER = HyperConfig(embed_dim=8, head_hidden=16, target_hidden=(8,), num_seeds=2, num_heads=2, cluster_inits=2)
ADAPT = AdaptConfig(inner_loss="infomax", num_inner_steps=2, inner_lr=0.5)


def _source(seed: int) -> TaskSource:
    """Overlapping blobs of 5 classes (context and features from the same rows), and TASKS suite tasks."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, NUM_IMAGES)
    features = (rng.normal(size=(NUM_IMAGES, FEATURE_DIM)) + labels[:, None]).astype(np.float32)
    context = np.concatenate([features, rng.normal(size=(NUM_IMAGES, CONTEXT_DIM - FEATURE_DIM))], 1)
    return TaskSource(TaskData(f"toy{seed}", "test", context.astype(np.float32), features, labels),
                      sample_tasks(labels, TASKS, K, N, seed=seed))


def _state_key(explorer: AdaptationExplorer) -> tuple:
    return explorer.dataset, explorer.task, explorer.num_steps, explorer.inner_lr, explorer.inner_loss


@pytest.fixture
def explorer() -> AdaptationExplorer:
    torch.manual_seed(0)
    hypernet = HyperNet(HYPER, CONTEXT_DIM, FEATURE_DIM, K)
    return AdaptationExplorer(hypernet, {"a": _source(0), "b": _source(1)}, ADAPT, max_steps=MAX_STEPS)


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """The tiny protocol's zero-shot seed-0 hypernetwork and its models, trained once."""
    return train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root, [("zero_shot", 0)])


def test_initial_state_matches_a_direct_run(explorer):
    """The first state is the config's settings; step 0 is the generated classifier, scored by Hungarian matching."""
    state = explorer.state
    assert (state.dataset, state.task, state.num_steps, state.inner_lr, state.inner_loss) == ("a", 0, 2, 0.5, "infomax")
    assert state.accuracy.shape == (MAX_STEPS + 1,)
    source = explorer.sources["a"]
    inputs = source.task_data.task_inputs(source.suite.indices[:1])
    with torch.no_grad():
        task_state = explorer.hypernet.prepare(inputs.features)
        logits = explorer.hypernet.logits(explorer.hypernet(inputs.context, task_state), task_state)
    assert state.accuracy[0] == pytest.approx(task_accuracy(logits, source.suite.labels[:1])[0])
    labels = source.suite.labels[0]
    np.testing.assert_array_equal(state.labels, labels)
    np.testing.assert_array_equal(state.classes, source.suite.classes[0])
    assert state.current_accuracy == pytest.approx(clustering_accuracy(state.pred, labels, K))
    assert np.mean(state.pred == labels) == pytest.approx(state.current_accuracy)  # pred is matched to the classes
    assert state.confusion.sum() == N and np.trace(state.confusion) == round(state.current_accuracy * N)
    np.testing.assert_allclose(state.embedding, pca_2d(source.task_data.features[source.suite.indices[0]]))


def test_state_changes_with_the_settings(explorer):
    """A new lr moves the adapted predictions but never step 0; a new loss, task or dataset changes the state."""
    small = explorer.set(num_steps=MAX_STEPS, inner_lr=0.01)
    large = explorer.set(inner_lr=5.0)
    assert large.inner_lr == 5.0 and large.seconds > 0.0  # a new lr re-runs the inner loop
    assert large.accuracy[0] == small.accuracy[0]
    pred_small = explorer._cache[("a", 0, 0.01, "infomax")][0]
    pred_large = explorer._cache[("a", 0, 5.0, "infomax")][0]
    assert np.array_equal(pred_small[0], pred_large[0]) and not np.array_equal(pred_small[-1], pred_large[-1])
    geometry = explorer.set(inner_loss="geometry", inner_lr=2.0)
    assert geometry.inner_loss == "geometry"
    assert not np.array_equal(explorer._cache[("a", 0, 2.0, "geometry")][0][-1], pred_large[-1])
    other_task = explorer.set(task=1)
    np.testing.assert_array_equal(other_task.labels, explorer.sources["a"].suite.labels[1])
    assert not np.allclose(other_task.embedding, geometry.embedding)
    moved = explorer.set(dataset="b")
    assert (moved.dataset, moved.task) == ("b", 0)  # a new dataset starts at its first task
    np.testing.assert_array_equal(moved.classes, explorer.sources["b"].suite.classes[0])
    assert (moved.num_steps, moved.inner_lr, moved.inner_loss) == (MAX_STEPS, 2.0, "geometry")


def test_the_cache_makes_a_repeated_setting_instant(explorer):
    """Moving the steps slider, or going back to an lr already run, is served from the cache (no inner loop)."""
    first = explorer.set(num_steps=0)
    assert first.seconds > 0.0
    slider = explorer.set(num_steps=MAX_STEPS)
    assert slider.seconds == 0.0 and slider.current_accuracy == pytest.approx(slider.accuracy[MAX_STEPS])
    np.testing.assert_array_equal(slider.accuracy, first.accuracy)
    assert explorer.set(inner_lr=3.0).seconds > 0.0
    back = explorer.set(inner_lr=0.5)
    assert back.seconds == 0.0
    np.testing.assert_array_equal(back.accuracy, first.accuracy)
    np.testing.assert_array_equal(back.pred, explorer.state_at(MAX_STEPS).pred)


@pytest.mark.parametrize("change, message", [
    ({"dataset": "nope"}, "unknown dataset"), ({"task": TASKS}, "out of range"), ({"task": -1}, "out of range"),
    ({"num_steps": MAX_STEPS + 1}, "num_steps"), ({"inner_lr": 0.0}, "inner_lr"), ({"inner_lr": 50.0}, "inner_lr"),
    ({"inner_loss": "l2"}, "inner_loss"), ({"num_steps": 1, "inner_loss": "l2"}, "inner_loss"),
])
def test_invalid_settings_raise_and_change_nothing(explorer, change, message):
    """A bad value (even beside good ones) raises and leaves every setting as it was."""
    explorer.set(num_steps=3)
    before = _state_key(explorer)
    with pytest.raises(ValueError, match=message):
        explorer.set(**change)
    assert _state_key(explorer) == before


def test_a_registered_inner_loss_is_offered(explorer, monkeypatch):
    """Inner losses come from the registry: a new one is a valid setting and runs."""
    monkeypatch.setitem(losses.INNER_LOSSES, "neg_max", lambda logits, reference, cfg: -logits.max(-1).values.mean(-1))
    state = explorer.set(inner_loss="neg_max", num_steps=MAX_STEPS)
    assert state.inner_loss == "neg_max" and state.accuracy.shape == (MAX_STEPS + 1,)


def test_step_grid_and_curves(explorer):
    """Small multiples skip steps beyond max_steps; curves for several lrs and losses restore the settings."""
    states = explorer.step_grid([0, 1, 3, MAX_STEPS + 10])
    assert [s.num_steps for s in states] == [0, 1, 3]
    curves = explorer.curves(inner_lrs=[0.1, 1.0], inner_losses=["entropy", "geometry"])
    assert list(curves) == ["lr=0.1", "lr=1", "entropy", "geometry"]
    assert all(c.shape == (MAX_STEPS + 1,) for c in curves.values())
    assert (explorer.inner_lr, explorer.inner_loss) == (0.5, "infomax")  # settings restored
    np.testing.assert_array_equal(curves["lr=1"], explorer.set(inner_lr=1.0).accuracy)


def test_zero_max_steps_and_bad_construction():
    """max_steps=0 shows the generated classifier only; empty sources or out-of-range task indices are refused."""
    torch.manual_seed(0)
    hypernet = HyperNet(HYPER, CONTEXT_DIM, FEATURE_DIM, K)
    explorer = AdaptationExplorer(hypernet, {"a": _source(0)}, dataclasses.replace(ADAPT, num_inner_steps=3),
                                  max_steps=0)
    assert explorer.state.accuracy.shape == (1,) and explorer.num_steps == 0
    with pytest.raises(ValueError, match="at least one dataset"):
        AdaptationExplorer(hypernet, {}, ADAPT)
    with pytest.raises(ValueError, match="max_steps"):
        AdaptationExplorer(hypernet, {"a": _source(0)}, ADAPT, max_steps=-1)
    source = _source(0)
    with pytest.raises(ValueError, match="only 5 rows"):
        TaskSource(source.task_data.subset(np.arange(5)), source.suite)


def test_pca_2d_orders_directions_by_variance():
    """The explorer's projection: the first axis carries the most variance, orientation fixed."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * np.array([5.0, 1.0, 0.1])
    proj = pca_2d(x)
    assert proj.shape == (200, 2) and proj[:, 0].var() > proj[:, 1].var() > 0
    assert np.allclose(np.abs(proj[:, 0]), np.abs(x[:, 0] - x[:, 0].mean()), atol=0.5)
    np.testing.assert_array_equal(pca_2d(x), proj)
    assert pca_2d(x[:, :1]).shape == (200, 2)


def test_explorer_widget_builds_and_its_controls_drive_the_explorer(explorer):
    """explorer_widget: dataset, task, loss, steps and lr controls; each change re-renders the PNG."""
    box = explorer_widget(explorer)
    controls = {c.description: c for row in box.children[:2] for c in row.children}
    assert set(controls) == {"dataset", "task", "inner loss", "inner steps", "inner lr"}
    assert list(controls["inner loss"].options) == list(losses.INNER_LOSSES)
    assert controls["inner steps"].max == MAX_STEPS and controls["task"].max == TASKS - 1
    shown = box.children[2].value
    assert shown[:8] == b"\x89PNG\r\n\x1a\n"
    controls["inner steps"].value = 4
    assert explorer.num_steps == 4
    controls["inner loss"].value = "entropy"
    assert explorer.inner_loss == "entropy"
    controls["dataset"].value = "b"
    assert explorer.dataset == "b" and controls["task"].max == TASKS - 1
    controls["inner lr"].value = 1.0
    assert explorer.inner_lr == pytest.approx(1.0)
    shown = box.children[2].value
    controls["task"].value = 1
    assert explorer.task == 1 and box.children[2].value != shown
    plt.close("all")


def test_explorer_state_figures(explorer):
    """The state, the step small multiples and the lr curves are drawn as figures."""
    figures = [plot_explorer_state(explorer.state), plot_step_multiples(explorer.step_grid([0, 2, 4])),
               plot_task_curves(explorer.curves(inner_lrs=[0.1, 1.0]))]
    assert all(len(f.axes) >= 1 for f in figures) and len(figures[1].axes) == 6
    plt.close("all")


def test_explorer_figure_updates_in_place(explorer):
    """The live figure's artists follow the state; a state of another K is refused."""
    view = ExplorerFigure(explorer.set(num_steps=0))
    first = view.png()
    state = explorer.set(num_steps=MAX_STEPS, inner_lr=3.0, task=2)
    view.update(state)
    _, y = view.curve.get_data()
    np.testing.assert_allclose(y, 100 * state.accuracy)
    assert [t.get_text() for t in view.ax_cm.texts] == [str(v) for v in state.confusion.ravel()]
    np.testing.assert_allclose(view.points.get_offsets(), state.embedding)
    assert len(view.rings.get_offsets()) == int((state.pred != state.labels).sum())
    assert view.png() != first and view.png()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="classes"):
        view.update(dataclasses.replace(state, classes=np.arange(K + 1)))
    plt.close("all")


def test_from_config_loads_the_protocols_hypernetwork_and_never_trains(trained, hmlib_home, tiny_mirror, tmp_path,
                                                                       monkeypatch):
    """Notebook 04's explorer: the protocol's checkpoint on the ablation suite of each held-out dataset; in a home
    without models it raises MissingArtifactError instead of training."""
    use_home(trained, hmlib_home)
    cfg = trained.cfg
    explorer = AdaptationExplorer.from_config(cfg)
    assert explorer.datasets == ["mnist"] and explorer.num_tasks() == cfg.ablation.num_tasks
    assert explorer.max_steps == max(cfg.ablation.step_grid) and explorer.num_steps == cfg.adapt.num_inner_steps
    state = explorer.set(num_steps=explorer.max_steps)
    assert state.accuracy.shape == (explorer.max_steps + 1,) and state.labels.shape == (cfg.ablation.task_size,)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    with pytest.raises(MissingArtifactError, match="make it with: hmlib run"):
        AdaptationExplorer.from_config(cfg)
    assert not (fresh / "models").exists()
