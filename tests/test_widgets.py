"""The interactive explorer's logic (no browser): settings in, adapted predictions, the adapted representation on
fixed axes, figures and the accuracy readout out."""
from __future__ import annotations

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from datafactory import class_patterns
from hmlib.artifacts import MissingArtifactError
from hmlib.backbone.model import ConvBackbone
from hmlib.data import sample_tasks
from hmlib.evaluation.conditions import build_suite
from hmlib.ablations import ablation_grid
from hmlib.hyper import losses
from hmlib.hyper.adapt import CANDIDATES, AdaptResult, adapt, adapt_candidates, predict_task, representation
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.losses import InnerLoss, task_accuracy
from hmlib.metrics import clustering_accuracy
from hmlib.plots.ablations import ExplorerFigure, plot_explorer_state, plot_step_multiples, plot_task_curves
from hmlib.widgets import CANDIDATE_LABELS, AdaptationExplorer, TaskSource, explorer_widget, project_along
from tinyprotocol import TEST_STEPS, tiny_config, train_home, use_home

NUM_IMAGES, CONTEXT_DIM, K, N, TASKS, MAX_STEPS = 180, 6, 3, 24, 3, 5
CFG = tiny_config(film={"cluster_inits": 2, "inner_lr": 0.2, "head_lr": 0.2}, adapt={"inner_loss": "neighbours"})
ADAPT = dataclasses.replace(CFG.adapt, num_inner_steps=1, test_steps=2)  # the explorer starts at the test-time count


def _source(seed: int) -> TaskSource:
    """Bar images of 5 classes (context rows noisy copies of their labels), and TASKS suite tasks of K classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, NUM_IMAGES)
    images = class_patterns(labels, 5, seed=seed)
    context = (labels[:, None] + rng.normal(size=(NUM_IMAGES, CONTEXT_DIM))).astype(np.float32)
    return TaskSource(TaskData(f"toy{seed}", "test", context, labels, images=images),
                      sample_tasks(labels, TASKS, K, N, seed=seed))


def step_views(hypernet: HyperNet, result: AdaptResult) -> list[np.ndarray]:
    """The adapted representation of the first task after each step of a trajectory (its parameters and logits)."""
    return [representation(hypernet, dataclasses.replace(result, params=p, logits=result.logits[:s + 1]))[0].numpy()
            for s, p in enumerate(result.trajectory)]


def _state_key(explorer: AdaptationExplorer) -> tuple:
    return explorer.dataset, explorer.task, explorer.num_steps, explorer.inner_lr, explorer.inner_loss


def _hypernet() -> HyperNet:
    torch.manual_seed(0)
    backbone = ConvBackbone((4, 8), 8, 5).eval()
    return HyperNet(CFG, CONTEXT_DIM, K, backbone=backbone)


@pytest.fixture
def explorer() -> AdaptationExplorer:
    return AdaptationExplorer(_hypernet(), {"a": _source(0), "b": _source(1)}, ADAPT, max_steps=MAX_STEPS)


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """The tiny protocol's seed-0 hypernetwork and its models, trained once."""
    return train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root, [0])


def test_initial_state_matches_a_direct_run(explorer):
    """The first state is the config's settings; what it shows is the candidate the method keeps (the label-free
    choice after the test-time steps, as predict_task makes it), followed to max_steps: its accuracy after 0..max_steps
    steps, scored by Hungarian matching, and its representation on fixed PCA axes. At the test-time step count the
    clusters are exactly the method's."""
    state = explorer.state
    assert (state.dataset, state.task, state.num_steps, state.inner_lr, state.inner_loss) == \
        ("a", 0, 2, ADAPT.lr_scale, "neighbours")
    assert state.accuracy.shape == (MAX_STEPS + 1,)
    source = explorer.sources["a"]
    inputs = source.task_data.task_inputs(source.suite.indices[:1])
    labels = source.suite.labels[0]
    method = predict_task(explorer.hypernet, inputs, ADAPT)  # the method at its test-time step count (2)
    assert explorer.state_at(ADAPT.test_steps).current_accuracy == task_accuracy(method[-1], labels[None])[0]
    np.testing.assert_array_equal(state.labels, labels)
    np.testing.assert_array_equal(state.classes, source.suite.classes[0])
    assert state.current_accuracy == pytest.approx(clustering_accuracy(state.pred, labels, K))
    assert np.mean(state.pred == labels) == pytest.approx(state.current_accuracy)  # pred is matched to the classes
    assert state.confusion.sum() == N and np.trace(state.confusion) == round(state.current_accuracy * N)
    assert ADAPT.candidates == tuple(CANDIDATES)  # the real choice: generated, stored and task statistics
    with torch.no_grad():
        _, pick = adapt_candidates(explorer.hypernet, inputs, ADAPT, num_steps=ADAPT.test_steps)
        assert state.candidate == tuple(CANDIDATES)[int(pick[0])]
        kept = adapt(explorer.hypernet, inputs, ADAPT, num_steps=MAX_STEPS, trajectory=True,
                     fixed=CANDIDATES[state.candidate] or None)
        np.testing.assert_array_equal(kept.logits[ADAPT.test_steps].argmax(-1), method[-1].argmax(-1))
        views = step_views(explorer.hypernet, kept)
        others = [step_views(explorer.hypernet, adapt(explorer.hypernet, inputs, ADAPT, num_steps=MAX_STEPS,
                                                      trajectory=True, fixed=CANDIDATES[c]))
                  for c in CANDIDATES if c != state.candidate]
    np.testing.assert_array_equal(state.accuracy, [task_accuracy(s, labels[None])[0] for s in kept.logits])
    np.testing.assert_allclose(state.embedding, project_along(views)[state.num_steps], atol=1e-5)
    # the other candidates' points are not what is shown
    assert all(not np.allclose(state.embedding, project_along(v)[state.num_steps], atol=1e-3) for v in others)
    assert views[0].shape == (N, CFG.backbone.embed_dim)  # film: the modulated embedding, not the logits


def test_the_candidate_shown_is_the_one_chosen_after_the_test_time_steps(monkeypatch):
    """Where the label-free choice after the test-time steps differs from the one after max_steps, the explorer
    follows the former (what the method outputs), and says which in its state."""
    hypernet = _hypernet()
    explorer = AdaptationExplorer(hypernet, {"a": _source(0)}, ADAPT, max_steps=MAX_STEPS)
    steps_seen = []
    real = adapt_candidates

    def choose(hypernet, inputs, cfg, *, num_steps=None, **kw):
        steps_seen.append(num_steps)
        results, pick = real(hypernet, inputs, cfg, num_steps=num_steps, **kw)
        return results, torch.full_like(pick, 1 if num_steps == ADAPT.test_steps else 2)  # stored there, else task

    monkeypatch.setattr("hmlib.widgets.adapt_candidates", choose)
    assert explorer.state.candidate == "stored" and steps_seen == [ADAPT.test_steps]
    with torch.no_grad():
        stored = adapt(hypernet, explorer.hypernet.check(explorer._task_inputs("a", 0)), ADAPT, num_steps=MAX_STEPS,
                       fixed=CANDIDATES["stored"])
    labels = explorer.sources["a"].suite.labels[:1]
    np.testing.assert_array_equal(explorer.state.accuracy, [task_accuracy(s, labels)[0] for s in stored.logits])


def test_the_representation_moves_on_fixed_axes_as_it_adapts():
    """With one candidate (no choice that could follow the step sizes), step 0's points do not depend on the step
    sizes; later steps move them (the FiLM and the head adapt)."""
    explorer = AdaptationExplorer(_hypernet(), {"a": _source(0)}, dataclasses.replace(ADAPT, candidates=("generated",)),
                                  max_steps=MAX_STEPS)
    start = explorer.set(num_steps=0).embedding
    end = explorer.set(num_steps=MAX_STEPS).embedding
    assert np.abs(end - start).max() > 1e-3
    other = explorer.set(inner_lr=4.0)
    np.testing.assert_allclose(explorer.state_at(0).embedding, start)
    assert not np.allclose(other.embedding, end)


def test_project_along_keeps_the_first_views_axes():
    """Every view is projected on the principal axes of the first one (centred on its mean): a translated copy
    moves by the translation's projection; the axes' orientation is fixed."""
    rng = np.random.default_rng(0)
    first = rng.normal(size=(50, 3)) * np.array([5.0, 2.0, 0.1])
    shift = np.array([1.0, -2.0, 3.0])
    projected = project_along([first, first + shift])
    assert projected.shape == (2, 50, 2)
    assert projected[0, :, 0].var() > projected[0, :, 1].var() > 0
    assert np.allclose(np.abs(projected[0, :, 0]), np.abs(first[:, 0] - first[:, 0].mean()), atol=0.5)
    np.testing.assert_allclose(projected[1] - projected[0], np.broadcast_to(projected[1, 0] - projected[0, 0],
                                                                            (50, 2)), atol=1e-10)
    assert abs(projected[1, 0, 0] - projected[0, 0, 0]) == pytest.approx(abs(shift[0]), abs=0.2)
    np.testing.assert_allclose(project_along([-first])[0], -projected[0], atol=1e-10)  # axes, not points, orient


def test_the_full_generator_shows_its_generated_networks_outputs():
    """For the prototype's generator (no backbone) the representation is the generated network's output,
    L2-normalised, step by step: the explorer's points after each step are that step's normalised logits."""
    cfg = tiny_config(hyper={"generation": "full"}, meta={"outer_loss": "aligned", "min_classes": K, "max_classes": K})
    torch.manual_seed(0)
    hypernet = HyperNet(cfg, CONTEXT_DIM, K, feature_dim=CONTEXT_DIM)
    source = _source(0)
    data = dataclasses.replace(source.task_data, images=None, features=source.task_data.context)
    explorer = AdaptationExplorer(hypernet, {"a": TaskSource(data, source.suite)}, cfg.adapt, max_steps=2)
    inputs = data.task_inputs(source.suite.indices[:1])
    with torch.no_grad():
        result = adapt(hypernet, inputs, dataclasses.replace(cfg.adapt, num_inner_steps=2), trajectory=True)
    view = representation(hypernet, result)
    torch.testing.assert_close(view, torch.nn.functional.normalize(result.logits[-1], dim=-1))
    torch.testing.assert_close(view.norm(dim=-1), torch.ones(1, N))
    assert not torch.allclose(view, result.logits[-1])  # normalised, not the raw logits
    views = step_views(hypernet, result)
    assert not np.allclose(views[0], views[-1], atol=1e-4)  # the steps move the outputs
    points = project_along(views)
    for s in range(3):
        np.testing.assert_allclose(explorer.set(num_steps=s).embedding, points[s], atol=1e-5)
    assert explorer.state.embedding.shape == (N, 2)


def test_state_changes_with_the_settings():
    """A new step-size scale moves the adapted predictions but never step 0 (one test-time candidate: the candidate
    kept cannot follow the scale); a new loss, task or dataset changes the state."""
    explorer = AdaptationExplorer(_hypernet(), {"a": _source(0), "b": _source(1)},
                                  dataclasses.replace(ADAPT, candidates=("generated",)), max_steps=MAX_STEPS)
    small = explorer.set(num_steps=MAX_STEPS, inner_lr=0.05)
    large = explorer.set(inner_lr=5.0)
    assert large.inner_lr == 5.0 and large.seconds > 0.0  # a new scale re-runs the inner loop
    assert large.accuracy[0] == small.accuracy[0]
    pred_small = explorer._cache[("a", 0, 0.05, "neighbours")][0]
    pred_large = explorer._cache[("a", 0, 5.0, "neighbours")][0]
    assert np.array_equal(pred_small[0], pred_large[0]) and not np.array_equal(pred_small[-1], pred_large[-1])
    entropy = explorer.set(inner_loss="entropy", inner_lr=2.0)
    assert entropy.inner_loss == "entropy"
    assert not np.array_equal(explorer._cache[("a", 0, 2.0, "entropy")][2], explorer._cache[("a", 0, 5.0,
                                                                                             "neighbours")][2])
    other_task = explorer.set(task=1)
    np.testing.assert_array_equal(other_task.labels, explorer.sources["a"].suite.labels[1])
    assert not np.allclose(other_task.embedding, entropy.embedding)
    moved = explorer.set(dataset="b")
    assert (moved.dataset, moved.task) == ("b", 0)  # a new dataset starts at its first task
    np.testing.assert_array_equal(moved.classes, explorer.sources["b"].suite.classes[0])
    assert (moved.num_steps, moved.inner_lr, moved.inner_loss) == (MAX_STEPS, 2.0, "entropy")


def test_the_cache_makes_a_repeated_setting_instant(explorer):
    """Moving the steps slider, or going back to a scale already run, is served from the cache (no inner loop)."""
    first = explorer.set(num_steps=0)
    assert first.seconds > 0.0
    slider = explorer.set(num_steps=MAX_STEPS)
    assert slider.seconds == 0.0 and slider.current_accuracy == pytest.approx(slider.accuracy[MAX_STEPS])
    np.testing.assert_array_equal(slider.accuracy, first.accuracy)
    assert explorer.set(inner_lr=3.0).seconds > 0.0
    back = explorer.set(inner_lr=ADAPT.lr_scale)
    assert back.seconds == 0.0
    np.testing.assert_array_equal(back.accuracy, first.accuracy)
    np.testing.assert_array_equal(back.pred, explorer.state_at(MAX_STEPS).pred)


@pytest.mark.parametrize("change, message", [
    ({"dataset": "nope"}, "unknown dataset"), ({"task": TASKS}, "out of range"), ({"task": -1}, "out of range"),
    ({"num_steps": MAX_STEPS + 1}, "num_steps"), ({"inner_lr": 0.01}, "step-size scale"),
    ({"inner_lr": 50.0}, "step-size scale"), ({"inner_loss": "l2"}, "inner_loss"),
    ({"num_steps": 1, "inner_loss": "l2"}, "inner_loss"),
])
def test_invalid_settings_raise_and_change_nothing(explorer, change, message):
    """A bad value (even beside good ones) raises and leaves every setting as it was."""
    explorer.set(num_steps=3)
    before = _state_key(explorer)
    with pytest.raises(ValueError, match=message):
        explorer.set(**change)
    assert _state_key(explorer) == before


def test_a_registered_inner_loss_is_offered(explorer, monkeypatch):
    """Inner losses come from the registry: a new one is a valid setting, runs, and is in the widget's dropdown."""
    monkeypatch.setitem(losses.INNER_LOSSES, "neg_max",
                        InnerLoss(lambda view, cfg: -view.logits.max(-1).values.mean(-1), "negative max logit"))
    state = explorer.set(inner_loss="neg_max", num_steps=MAX_STEPS)
    assert state.inner_loss == "neg_max" and state.accuracy.shape == (MAX_STEPS + 1,)
    box = explorer_widget(explorer)
    assert "neg_max" in {c.description: c for row in box.children[:2] for c in row.children}["inner loss"].options
    plt.close("all")


def test_step_grid_and_curves(explorer):
    """Small multiples skip steps beyond max_steps; curves for several scales and losses restore the settings."""
    states = explorer.step_grid([0, 1, 3, MAX_STEPS + 10])
    assert [s.num_steps for s in states] == [0, 1, 3]
    curves = explorer.curves(inner_lrs=[0.5, 2.0], inner_losses=["entropy", "infomax"])
    assert list(curves) == ["step sizes x 0.5", "step sizes x 2", "entropy", "infomax"]
    assert all(c.shape == (MAX_STEPS + 1,) for c in curves.values())
    assert (explorer.inner_lr, explorer.inner_loss) == (ADAPT.lr_scale, "neighbours")  # settings restored
    np.testing.assert_array_equal(curves["step sizes x 2"], explorer.set(inner_lr=2.0).accuracy)


def test_zero_max_steps_and_bad_construction():
    """max_steps=0 shows the generated network only; empty sources or out-of-range task indices are refused."""
    hypernet = _hypernet()
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


def test_explorer_widget_builds_and_its_controls_drive_the_explorer(explorer):
    """explorer_widget: dataset, task, loss, steps and step-size controls; each change re-renders the PNG and the
    accuracy readout, which states the current accuracy and step count."""
    box = explorer_widget(explorer)
    controls = {c.description: c for row in box.children[:2] for c in row.children}
    readout, image = box.children[2], box.children[3]
    assert set(controls) == {"dataset", "task", "inner loss", "inner steps", "step sizes x"}
    assert list(controls["inner loss"].options) == list(losses.INNER_LOSSES)
    assert controls["inner steps"].max == MAX_STEPS and controls["task"].max == TASKS - 1
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n"

    def shows_the_state():
        state = explorer.state
        assert readout.value == (f"accuracy {100 * state.current_accuracy:.1f}% after {state.num_steps} inner steps "
                                 f"({CANDIDATE_LABELS[state.candidate]})")

    shows_the_state()
    controls["inner steps"].value = 4
    assert explorer.num_steps == 4 and "after 4 inner steps (" in readout.value
    shows_the_state()
    controls["inner loss"].value = "entropy"
    assert explorer.inner_loss == "entropy"
    controls["dataset"].value = "b"
    assert explorer.dataset == "b" and controls["task"].max == TASKS - 1
    controls["step sizes x"].value = 2.0
    assert explorer.inner_lr == pytest.approx(2.0)
    shown = image.value
    controls["task"].value = 1
    assert explorer.task == 1 and image.value != shown
    shows_the_state()
    plt.close("all")


def test_explorer_state_figures(explorer):
    """The state, the step small multiples and the curves are drawn as figures."""
    figures = [plot_explorer_state(explorer.state), plot_step_multiples(explorer.step_grid([0, 2, 4])),
               plot_task_curves(explorer.curves(inner_lrs=[0.5, 2.0]))]
    assert all(len(f.axes) >= 1 for f in figures) and len(figures[1].axes) == 6
    assert figures[0]._suptitle.get_text().endswith(f"{100 * explorer.state.current_accuracy:.1f}% after 2 steps")
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
    """Notebook 04's explorer: the protocol's checkpoint on the ablation tasks of each held-out dataset (clean and
    shifted); in a home without models it raises MissingArtifactError instead of training."""
    use_home(trained, hmlib_home)
    cfg = trained.cfg
    explorer = AdaptationExplorer.from_config(cfg)
    assert explorer.datasets == ["mnist", "mnist+rotate"] and explorer.num_tasks() == cfg.ablation.num_tasks
    assert explorer.max_steps == max(cfg.ablation.step_grid) == TEST_STEPS
    assert explorer.num_steps == cfg.adapt.steps_at_test == TEST_STEPS != cfg.adapt.num_inner_steps  # at test time
    assert explorer.inner_lr == cfg.adapt.lr_scale
    for condition in ablation_grid(cfg):
        suite = build_suite(cfg, condition, cfg.ablation.num_tasks)
        np.testing.assert_array_equal(explorer.sources[condition.dataset].suite.indices, suite.indices)
    state = explorer.set(dataset="mnist+rotate", num_steps=explorer.max_steps)
    K_, N_ = cfg.ablation.shapes[0]
    assert state.accuracy.shape == (explorer.max_steps + 1,) and state.labels.shape == (N_,)
    assert state.classes.shape == (K_,)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    with pytest.raises(MissingArtifactError, match="make it with: hmlib run"):
        AdaptationExplorer.from_config(cfg)
    assert not (fresh / "models").exists()
