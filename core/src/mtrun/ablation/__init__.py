"""``mtrun ablate``: a grid or list of recipe variants × seeds, validated up front, run one by
one (resumably), summarised as the papers' ablation tables (see docs/ablations.md)."""

from mtrun.ablation.plan import AblationPlan, Run, Variant, parse_grid, parse_variant, plan_ablation
from mtrun.ablation.sweep import command, run_metrics, sweep, validate_plan
from mtrun.ablation.table import mean_ci, rows, write_tables

__all__ = [
    "AblationPlan",
    "Run",
    "Variant",
    "command",
    "mean_ci",
    "parse_grid",
    "parse_variant",
    "plan_ablation",
    "rows",
    "run_metrics",
    "sweep",
    "validate_plan",
    "write_tables",
]
