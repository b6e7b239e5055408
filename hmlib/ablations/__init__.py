"""The ablation stage (notebook 04): what each part of the method buys, every variant on identical tasks."""
from hmlib.ablations.report import (AblationResult, conclusions, describe, headline_rows, step_table, step_table_rows,
                                    table_rows)
from hmlib.ablations.run import ablation_grid, ablation_seeds, run_ablation, run_all
from hmlib.ablations.spec import Ablation, Variant, define_ablations

__all__ = ["Ablation", "AblationResult", "Variant", "ablation_grid", "ablation_seeds", "conclusions",
           "define_ablations", "describe", "headline_rows", "run_ablation", "run_all", "step_table",
           "step_table_rows", "table_rows"]
