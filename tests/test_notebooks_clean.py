"""Committed notebooks carry no outputs and open with the house parameters cell."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest

from hmlib import paths
from hmlib.runner import discover_notebooks

EXPECTED_PARAMETERS = {"profile": "default", "config_path": None}


def notebook_problems(nb: nbformat.NotebookNode, series_notebook: bool = True) -> list[str]:
    """Every way ``nb`` breaks the house rules for committed notebooks (empty when clean)."""
    problems = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, cell in code:
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has an execution count")
        if "injected-parameters" in cell.metadata.get("tags", []):
            problems.append(f"cell {i} is an injected-parameters cell (an executed copy was committed)")
    if "widgets" in nb.metadata:
        problems.append("notebook metadata holds saved widget state")
    if not series_notebook:
        return problems
    if not code:
        return problems + ["no code cells"]
    first_index, first = code[0]
    if "parameters" not in first.metadata.get("tags", []):
        problems.append(f"first code cell (cell {first_index}) is not tagged 'parameters'")
    try:
        tree = ast.parse(first.source)
        assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
        if len(assigned) != len(tree.body):
            raise ValueError("statements other than plain assignments")
    except (SyntaxError, ValueError) as err:
        problems.append(f"parameters cell must hold only plain literal assignments ({err})")
    else:
        if assigned != EXPECTED_PARAMETERS:
            problems.append(f"parameters cell assigns {assigned}, expected {EXPECTED_PARAMETERS}")
    return problems


SKIPPED_FOLDERS = {"reports", "build", "data_cache", "models", "results", "node_modules"}


def _repository_notebooks() -> list[Path]:
    """Every .ipynb in the repository, outside hidden folders (.venv, checkpoints) and artifact folders."""
    found = []
    for folder, subfolders, files in os.walk(paths.REPO_ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        found.extend(Path(folder) / f for f in files if f.endswith(".ipynb"))
    return sorted(found)


def test_committed_notebooks_are_clean():
    series = set(discover_notebooks())
    problems = {}
    for path in _repository_notebooks():
        found = notebook_problems(nbformat.read(path, as_version=4), series_notebook=path in series)
        if found:
            problems[str(path.relative_to(paths.REPO_ROOT))] = found
    assert not problems, f"notebooks to clear (jupyter nbconvert --clear-output --inplace) or fix: {problems}"


def _clean_notebook() -> nbformat.NotebookNode:
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.cells = [v4.new_markdown_cell("# T"),
                v4.new_code_cell('profile = "default"\nconfig_path = None', metadata={"tags": ["parameters"]}),
                v4.new_code_cell("import hmlib\ncfg = hmlib.load_config(profile, config_path)")]
    return nb


def test_checker_accepts_a_clean_notebook():
    assert notebook_problems(_clean_notebook()) == []


@pytest.mark.parametrize("spoil, message", [
    (lambda nb: nb.cells[2].outputs.append(nbformat.v4.new_output("stream", text="hi")), "has outputs"),
    (lambda nb: nb.cells[2].__setitem__("execution_count", 3), "execution count"),
    (lambda nb: nb.cells[1].metadata.__setitem__("tags", []), "not tagged 'parameters'"),
    (lambda nb: nb.cells[1].__setitem__("source", 'profile = "smoke"\nconfig_path = None'), "expected"),
    (lambda nb: nb.cells[1].__setitem__("source", 'profile = "default"\nconfig_path = None\nn = 2 * 3'), "plain literal"),
    (lambda nb: nb.metadata.__setitem__("widgets", {}), "widget state"),
])
def test_checker_catches_each_problem(spoil, message):
    nb = _clean_notebook()
    spoil(nb)
    assert any(message in p for p in notebook_problems(nb)), notebook_problems(nb)
