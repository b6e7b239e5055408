"""Slow tier: README as a test (issue 19). Every command of README.md's ```bash blocks runs, in README order, and
exits 0; so does its ```python block.

Where: a scratch clone of the repository in tmp_path (the tracked and untracked-but-not-ignored files, copied), with
``HMLIB_HOME`` set to its root and every command run from that root with ``bash -c``: the README's relative paths
(``models/hypernet_seed*-*.pt``, ``results/my_adapted``, ``my.json``) resolve there as in a fresh clone, and
``hmlib results --write`` rewrites the clone's README, never the repository's (asserted). ``PYTHONPATH`` names the
clone, so ``hmlib`` (the console script of the venv running pytest, first on ``PATH``) imports the clone's package;
``HMLIB_DATA_DIR`` is the offline mirror CI provides (``../shared/data`` beside the repository); the hub is off.
Every step shares that home, so later commands see what earlier ones made.

What differs from the README is in one table, ``DEVIATIONS``, below; every entry must match something in the README
(a stale entry fails the test). ``make`` is never called to do work: inside pytest its stamp may be out of date (it
is on a developer's checkout) and the recipe would then pip-install the clone into the venv; each ``make X`` runs
the command ``make -n X`` prints for it instead, and the test asserts that it does.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hmlib import paths

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = paths.REPO_ROOT
DEFAULT_MIRROR = REPO.parent / "shared" / "data"
DATA_DIR = os.environ.get("HMLIB_DATA_DIR") or (str(DEFAULT_MIRROR) if DEFAULT_MIRROR.is_dir() else None)
VENV = Path(sys.prefix)  # the environment running pytest: `make`'s VENV, and `hmlib` on PATH
BIN = VENV / "bin"
STEP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Deviation:
    """One difference between what README.md says and what this test runs."""

    readme: str  # the README's text (a command line without its '# comment', or a fragment of one)
    runs: str | None  # what runs instead ({bin} {images} {mirror} {hash} {bench} filled in at run time); None: not run
    why: str
    kind: str = "line"  # 'text': a fragment replaced in every line of every block (in this order); 'line': a whole
    # command line; 'prose': a command the README names outside a code block, run after the Quick start block
    exit_status: int = 0  # what the README documents for it (2: a refusal, one line on stderr)


# ------------------------------------------------------------ every deviation from README.md, in one place
DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("--profile default", "--profile smoke", kind="text",
              why="the smoke profile ('tiny sizes for tests and CI'); the default one takes 20+ minutes a run"),
    Deviation("/path/to/mirror", "{mirror}", kind="text",
              why="a mirror folder: links to the offline mirror's datasets, plus my_set/{train,test}.parquet "
                  "(the mirror's first 1,200 / 600 mnist rows) as the README's dataset of your own"),
    Deviation("path/to/mirror", "{mirror}", kind="text", why="the same mirror (the cluster line's spelling)"),
    Deviation("path/to/images", "{images}", kind="text",
              why="1,000 PNGs written from the smoke cache (mnist train + test) after `make run`: enough for "
                  "--adapt to adapt (it needs 1,000)"),
    Deviation("models/hypernet_seed0-<hash>.pt", "models/hypernet_seed0-{hash}.pt", kind="text",
              why="the python block's placeholder: the one seed-0 checkpoint in the scratch clone at that point; "
                  "its undefined `images` is the first 200 PNGs, once as a uint8 array, once as PIL images"),
    Deviation("make run", "{bin}/hmlib run --profile smoke",
              why="= `make run PROFILE=smoke` (the README's small run): the recipe `make -n` prints (asserted)"),
    Deviation("make test", None,
              why="not re-run inside itself; asserted instead: its recipe is `{bin}/python -m pytest` (every tier, "
                  "this test included) and .ci/run runs `make test`"),
    Deviation("hmlib run --from 04 --timeout 600", "hmlib run --from 04 --timeout 600 --profile smoke",
              why="without --profile it is the default profile"),
    Deviation("hmlib cluster org/dataset --k 4", "hmlib cluster org/dataset --k 4", exit_status=2,
              why="a hub id needs the network (the README says so); offline it must refuse in one line"),
    Deviation("conda env create -f environment.yml && conda activate hmlib", None, kind="prose",
              why="conda lines are not run (no conda here or in CI); the rest of that line is `hmlib run` and "
                  "`pytest`, run above"),
    Deviation("make benchmark", "{bin}/hmlib benchmark --profile smoke", kind="prose",
              why="= `make benchmark PROFILE=smoke`: the recipe `make -n` prints (asserted)"),
    Deviation("make benchmark-transductive", "{bin}/hmlib benchmark --setting transductive --profile smoke",
              kind="prose", why="= `make benchmark-transductive PROFILE=smoke`: the recipe `make -n` prints (asserted)"),
    Deviation("make bench", "{bench}", kind="prose",
              why="every benchmarks/bench_*.py as the recipe runs them (asserted with `make -n`), each with its "
                  "smallest documented options (BENCH_OPTIONS): with none they time the default profile for many "
                  "minutes"),
    Deviation("make folds", "{folds}", kind="prose",
              why="= `make folds PROFILE=smoke FOLDS=fashion_mnist`: the recipe `make -n` prints (it is what runs), "
                  "one fold at the smoke profile's sizes (each fold is a whole pipeline; tests/test_lodo_folds.py "
                  "checks both folds' configs)"),
    Deviation("hmlib results --write", "{bin}/hmlib results --write", kind="prose", exit_status=2,
              why="the README's tables describe the default protocol: on a smoke run it must refuse in one line"),
    Deviation("make results", "{bin}/hmlib results --write --allow-other-profile", kind="prose",
              why="the recipe `make -n` prints (asserted) plus --allow-other-profile, as the refusal says; it "
                  "rewrites the scratch clone's README and docs/results.json, not the repository's (asserted)"),
)

#: `make bench` passes no options; these are the smallest each script documents (the set of scripts is asserted).
BENCH_OPTIONS: dict[str, str] = {
    "bench_allocator.py": "--tasks 2 --images 64 --steps 2 --repeats 1",
    "bench_cluster.py": "--images 200 --datasets mnist --ks 4 --folders 1 --no-auto",
    "bench_data.py": "--profile smoke --num-tasks 100",
    "bench_eval.py": "--profile smoke --tasks 2 --n 64",
    "bench_meta.py": "--profile smoke --iterations 2 --tasks 2",
    "bench_vae.py": "--profile smoke --train-images 256 --encode-images 512",
    "bench_widgets.py": "--profile smoke --num-images 64 --updates 2",
}

#: What the README says a command leaves behind (relative to the scratch clone), checked right after it.
LEAVES: dict[str, tuple[str, ...]] = {
    "make run": ("reports/index.html", "models/pipeline.json", "results/eval_zero_shot.json"),
    "hmlib cluster path/to/images --k 5": tuple(f"results/cluster/images/{name}" for name in
                                                ("assignments.csv", "clusters.html", "summary.json")),
    "hmlib cluster path/to/images --k 5 --adapt --out results/my_adapted":
        tuple(f"results/my_adapted/{name}" for name in
              ("assignments.csv", "clusters.html", "summary.json", "backbone_adapted.pt")),
    "hmlib cluster path/to/mirror/my_set --k 10 --steps 8 --out results/my_clusters":
        ("results/my_clusters/assignments.csv",),
    "echo '{\"task\": {\"num_images\": 128}, \"adapt\": {\"test_steps\": 16}}' > my.json": ("my.json",),
    "make benchmark": ("results/benchmark_zero_shot.json",),
    "make benchmark-transductive": ("results/benchmark_transductive.json",),
    "make results": ("docs/results.json",),
    "make folds": ("lodo/fashion_mnist/reports/index.html", "lodo/fashion_mnist/results/eval_zero_shot.json"),
}

MIRROR_SUBSET = {"train": 1200, "test": 600}  # rows of the mirror's mnist copied as my_set
SNIPPET_IMAGES = 200


# ---------------------------------------------------------------------------------------------- README


def strip_comment(line: str) -> str:
    """A shell line without its comment: a '#' that starts a word outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(text: str) -> list[tuple[str, list[str]]]:
    """``(language, items)`` of every fenced bash / python block in order: a bash block's command lines (comments
    dropped, continuation lines joined), a python block's source as its one item."""
    blocks = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if language == "python":
            blocks.append((language, [body]))
        elif language in ("bash", "sh", "shell"):
            lines = [strip_comment(line) for line in body.replace("\\\n", " ").splitlines()]
            blocks.append(("bash", [line for line in lines if line.strip()]))
    return blocks


# ---------------------------------------------------------------------------------------------- helpers


def _unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere: CI must run the README."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: .ci/run provides it)")
    pytest.skip(what)


def scratch_clone(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files (what a clone of this work tree holds)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.fail(f"cannot list the repository's files with git: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is left out, as a commit would
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def write_mirror(root: Path, data_dir: Path) -> Path:
    """The README's /path/to/mirror: the offline mirror's datasets (links) and my_set, a slice of its mnist."""
    import pyarrow.parquet as pq

    root.mkdir()
    for dataset in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        (root / dataset.name).symlink_to(dataset, target_is_directory=True)
    (root / "my_set").mkdir()
    for split, rows in MIRROR_SUBSET.items():
        table = pq.read_table(data_dir / "mnist" / f"{split}.parquet")
        pq.write_table(table.slice(0, rows), root / "my_set" / f"{split}.parquet")  # keeps the hub schema metadata
    return root


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def normalise(command: str) -> str:
    return " ".join(command.split())


class Session:
    """Runs commands in the scratch clone, keeps a log of them and collects what went wrong: a README command that
    fails does not stop the ones after it, so one run names every broken command (the test then fails)."""

    def __init__(self, clone: Path, env: dict[str, str]) -> None:
        self.clone, self.env = clone, env
        self.log: list[tuple[float, int, str]] = []
        self.failures: list[str] = []

    def run(self, label: str, command: str, expect: int = 0) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", command], cwd=self.clone, env=self.env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT_S)
        seconds = time.monotonic() - started
        self.log.append((seconds, proc.returncode, label))
        shown = command if "\n" not in command else command.splitlines()[0] + " ... (a script)"
        ran = "" if command == label else f"\n           ran: {shown if len(shown) < 600 else shown[:600] + ' ...'}"
        print(f"[{seconds:6.1f} s] exit {proc.returncode}  {label}{ran}", flush=True)
        problem = None
        if proc.returncode != expect:
            problem = f"exited {proc.returncode}, expected {expect}"
        elif expect == 2 and (len(proc.stderr.strip().splitlines()) != 1 or "Traceback" in proc.stderr):
            problem = "must refuse in one line on stderr"
        if problem:
            self.fail(f"`{label}` {problem}{ran}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n"
                      f"{proc.stderr[-4000:]}")
        return proc

    def fail(self, message: str) -> None:
        print(f"           FAILED: {message.splitlines()[0]}", flush=True)
        self.failures.append(message)

    def summary(self) -> str:
        return "\n".join(f"{s:7.1f} s  exit {rc:<3} {label}" for s, rc, label in self.log) + \
            f"\n{sum(s for s, *_ in self.log):7.1f} s  total"


def make_recipe(clone: Path, target: str, *variables: str) -> str:
    """The command(s) ``make TARGET VARIABLES`` runs in the clone, with VENV the environment running pytest: a dry
    run (``make -n``, executing nothing) with the install stamp taken as up to date (``-o``), so only TARGET's own
    recipe is printed (the argument check too is taken as done: tests/test_faults_make.py tests it); the variables the
    README's Makefile reads from the environment are set empty."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-o", f"{VENV}/.hmlib-installed", "-o", "check-args", target,
                           f"VENV={VENV}", "CONFIG=", "DEVICE=", "PYTEST_ARGS=", *variables],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"make -n {target} failed: {proc.stderr}"
    return normalise(proc.stdout.replace("\\\n", " "))  # one line: a continued recipe line joined as the shell would


def check_ci_runs_make_test(clone: Path) -> None:
    """`.ci/run` runs exactly the README's test command, `make test` (outside comments and echo lines)."""
    lines = [line.strip() for line in (clone / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith(("#", "echo"))]
    calls = [line for line in commands if re.search(r"(^|[\s;&|!(])make\s+test(\s*$|\s*;|\s*\))", line)]
    assert len(calls) == 1, f".ci/run must run `make test` once; found {calls}"
    assert not re.search(r"make\s+test\s+\S", calls[0].split(";")[0]), f"`make test` with extra arguments: {calls[0]}"
    assert not [line for line in commands if re.search(r"\bpytest\b", line)], ".ci/run calls pytest directly"


# ---------------------------------------------------------------------------------------------- the test


def test_every_readme_command_runs_in_order(tmp_path):
    if DATA_DIR is None or not Path(DATA_DIR).is_dir():
        _unavailable(f"data mirror not found (HMLIB_DATA_DIR={DATA_DIR!r}, default {DEFAULT_MIRROR})")
    for tool in ("make", "git", "bash"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed")
    if not (BIN / "hmlib").is_file():
        _unavailable(f"no hmlib console script in {BIN} (install the package: `make setup`)")
    data_dir = Path(DATA_DIR).resolve()
    protected = {name: sha256(REPO / name) for name in ("README.md", "docs/results.json")}
    clone = scratch_clone(tmp_path / "clone")
    readme = (clone / "README.md").read_text()
    blocks = readme_blocks(readme)
    assert [language for language, _ in blocks].count("bash") >= 4 and any(lang == "python" for lang, _ in blocks)

    env = {k: v for k, v in os.environ.items() if k not in ("HMLIB_DEVICE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HMLIB_HOME=str(clone), HMLIB_DATA_DIR=str(data_dir), PYTHONPATH=str(clone),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    session = Session(clone, env)
    where = session.run("(the test) which hmlib", "python -c 'import hmlib; print(hmlib.__file__)'").stdout.strip()
    assert Path(where).resolve().is_relative_to(clone.resolve()), f"hmlib imported from {where}, not the clone"

    # ---- the table: every entry matches the README, and each `make X` runs what the Makefile says
    texts = [d for d in DEVIATIONS if d.kind == "text"]
    lines = {d.readme: d for d in DEVIATIONS if d.kind == "line"}
    every_line = [item for _, items in blocks for item in items]
    for d in DEVIATIONS:
        if d.kind == "prose":
            assert f"`{d.readme}`" in readme or d.readme in " ".join(readme.split()), \
                f"DEVIATIONS names `{d.readme}`, which the README no longer gives"
        elif d.kind == "text":
            assert any(d.readme in item for item in every_line), f"no README command contains {d.readme!r}"
        else:
            assert d.readme in every_line, f"no README command line is {d.readme!r}"
    prose = {d.readme for d in DEVIATIONS if d.kind == "prose"}
    assert not set(LEAVES) - set(every_line) - prose, f"LEAVES names no README command: {set(LEAVES) - set(every_line)}"
    recipes = {"make run": make_recipe(clone, "run", "PROFILE=smoke"),
               "make benchmark": make_recipe(clone, "benchmark", "PROFILE=smoke"),
               "make benchmark-transductive": make_recipe(clone, "benchmark-transductive", "PROFILE=smoke"),
               "make results": make_recipe(clone, "results")}
    for readme_text, recipe in recipes.items():
        runs = next(d.runs for d in DEVIATIONS if d.readme == readme_text)
        assert runs.format(bin=BIN).startswith(recipe), f"`{readme_text}` runs `{recipe}`; the table says `{runs}`"
    assert make_recipe(clone, "test") == f"{BIN}/python -m pytest", "`make test` no longer runs every test"
    check_ci_runs_make_test(clone)
    bench_recipe = make_recipe(clone, "bench")
    assert bench_recipe == normalise(f'set -e; for script in benchmarks/bench_*.py; do echo "== $script"; '
                                     f'{BIN}/python $script; done'), f"`make bench` now runs: {bench_recipe}"
    scripts = sorted(p.name for p in (clone / "benchmarks").glob("bench_*.py"))
    assert scripts == sorted(BENCH_OPTIONS), f"BENCH_OPTIONS must give options for exactly {scripts}"
    bench = "set -e; " + " ".join(f'echo "== benchmarks/{s}"; {BIN}/python benchmarks/{s} {BENCH_OPTIONS[s]};'
                                  for s in scripts)

    folds = make_recipe(clone, "folds", "PROFILE=smoke", "FOLDS=fashion_mnist")
    fold_run = f"HMLIB_HOME={clone.resolve()}/lodo/$fold {BIN}/hmlib run --profile smoke --config docs/lodo/$fold.json"
    assert fold_run in folds, f"`make folds` now runs: {folds}"

    made: dict[str, str] = {"bin": str(BIN), "bench": bench, "folds": folds}

    def fill(template: str) -> str:
        if "{images}" in template and "images" not in made:
            made["images"] = write_images(session, tmp_path / "images")
        if "{mirror}" in template and "mirror" not in made:
            made["mirror"] = str(write_mirror(tmp_path / "mirror", data_dir))
        if "{hash}" in template and "hash" not in made:
            found = sorted((clone / "models").glob("hypernet_seed0-*.pt"))
            assert len(found) == 1, f"the python block names one seed-0 checkpoint; models/ holds {found}"
            made["hash"] = found[0].stem.split("-", 1)[1]
        return template.format(**{k: made.get(k, "{" + k + "}")
                                  for k in ("bin", "bench", "folds", "images", "mirror", "hash")})

    def substitute(text: str) -> str:
        for d in texts:
            text = text.replace(d.readme, fill(d.runs))
        return text

    def run_line(line: str) -> None:
        deviation = lines.get(line)
        if deviation is not None and deviation.runs is None:
            print(f"[not run] {line}: {deviation.why}")
            return
        command = fill(deviation.runs) if deviation is not None else substitute(line)
        session.run(line, command, expect=deviation.exit_status if deviation is not None else 0)
        check_leaves(line)

    def check_leaves(readme_text: str) -> None:
        for relative in LEAVES.get(readme_text, ()):
            if not (clone / relative).exists():
                session.fail(f"`{readme_text}` should leave {relative} (README says so); it is missing")

    # ---- README order: every block; the prose commands after the Quick start block (where the README names them)
    for index, (language, items) in enumerate(blocks):
        if language == "python":
            run_python_block(session, substitute(items[0]), fill("{images}"))
        else:
            for line in items:
                run_line(line)
        if index == 0:
            for d in (d for d in DEVIATIONS if d.kind == "prose"):
                if d.runs is None:
                    print(f"[not run] {d.readme}: {d.why}")
                    continue
                session.run(d.readme, fill(d.runs), expect=d.exit_status)
                check_leaves(d.readme)
            if "profile `smoke`" not in (clone / "README.md").read_text():
                session.fail("`hmlib results --write --allow-other-profile` must say in the README which profile "
                             "made its tables")

    print(session.summary())
    assert {name: sha256(REPO / name) for name in protected} == protected, \
        "a README command wrote into the repository itself, not the scratch clone"
    if session.failures:
        pytest.fail(f"{len(session.failures)} README command(s) failed:\n\n" + "\n\n".join(session.failures) +
                    f"\n\n--- every step\n{session.summary()}", pytrace=False)


def write_images(session: Session, folder: Path) -> str:
    """The README's path/to/images: 1,000 PNGs of mnist (train then test split) from the smoke cache `make run` made."""
    script = ("import sys, numpy as np\n"
              "from hmlib import data\n"
              "from hmlib.config import load_config\n"
              "from hmlib.cluster.images import export_image_folder\n"
              "cfg = load_config('smoke').data\n"
              "images = np.concatenate([data.load_split('mnist', s, cfg, progress=False).images "
              "for s in ('train', 'test')])[:1000]\n"
              "assert len(images) == 1000, len(images)\n"
              "export_image_folder(images, sys.argv[1])\n")
    session.run("(the test) write path/to/images", f"python -c {shlex.quote(script)} {shlex.quote(str(folder))}")
    return str(folder)


def run_python_block(session: Session, source: str, images: str) -> None:
    """The README's python block, with `images` the first PNGs of path/to/images: as a uint8 array (N, H, W), then as
    a list of PIL images (the README allows both); its results checked against what the comments promise."""
    script = f"""
import numpy as np
from pathlib import Path
from PIL import Image
SOURCE = {source!r}
files = sorted(Path({images!r}).glob("*.png"))[:{SNIPPET_IMAGES}]
for images in (np.stack([np.asarray(Image.open(f)) for f in files]), [Image.open(f) for f in files]):
    scope = {{"images": images}}
    exec(compile(SOURCE, "README.md (python block)", "exec"), scope)
    labels, clusterer = np.asarray(scope["labels"]), scope["clusterer"]
    n = len(files)
    assert labels.shape == (n,) and set(labels.tolist()) <= set(range(5)), labels
    assert np.asarray(clusterer.confidence_).shape == (n,)
    assert clusterer.predict_proba(images).shape == (n, 5)
    embedding = clusterer.transform(images)
    assert embedding.ndim == 2 and embedding.shape[0] == n, embedding.shape
print("the python block ran on", n, "images, as an array and as PIL images")
"""
    session.run("(python block) HyperClusterer.from_checkpoint ...", f"python -c {shlex.quote(script)}")
