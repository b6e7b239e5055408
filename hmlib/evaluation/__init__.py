"""The evaluation stage: the grid of conditions, the method registry, scoring over replicate seeds, tables and
``hmlib eval``."""
from hmlib.evaluation.conditions import Condition, build_suite, grid, suite_fingerprint, suite_for
from hmlib.evaluation.evaluate import (EvalError, default_results_path, evaluate_setting, load_bundles, load_results,
                                       per_task_accuracy)
from hmlib.evaluation.methods import METHODS, Method, MethodContext, register, score
from hmlib.evaluation.tables import (condition_rows, grid_summary, headline_rows, heatmap_data, markdown_table,
                                     strongest_baseline, summary_markdown)

__all__ = ["Condition", "EvalError", "METHODS", "Method", "MethodContext", "build_suite", "condition_rows",
           "default_results_path", "evaluate_setting", "grid", "grid_summary", "headline_rows", "heatmap_data",
           "load_bundles", "load_results", "markdown_table", "per_task_accuracy", "register", "score",
           "strongest_baseline", "suite_fingerprint", "suite_for", "summary_markdown"]
