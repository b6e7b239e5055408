"""The evaluation stage: the fixed suite, the method registry, scoring over replicate seeds, tables and ``hmlib eval``."""
from hmlib.evaluation.evaluate import (EvalError, default_results_path, evaluate_setting, load_bundles, load_results,
                                       per_task_accuracy)
from hmlib.evaluation.methods import METHODS, Method, register
from hmlib.evaluation.suite import build_suite, suite_fingerprint, suite_from_labels
from hmlib.evaluation.tables import headline_rows, markdown_table, strongest_baseline, summary_rows

__all__ = ["EvalError", "METHODS", "Method", "build_suite", "default_results_path", "evaluate_setting",
           "headline_rows", "load_bundles", "load_results", "markdown_table", "per_task_accuracy", "register",
           "strongest_baseline", "suite_fingerprint", "suite_from_labels", "summary_rows"]
