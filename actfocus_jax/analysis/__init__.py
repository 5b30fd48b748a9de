"""Action Bottleneck analysis (DESIGN.md section 3): correlation statistic and gradient variant."""

from actfocus_jax.analysis.advantage_balance import advantage_by_turn
from actfocus_jax.analysis.bottleneck import (
    ANALYSIS_ROLES,
    ROLE_NAMES,
    VARIANTS,
    BottleneckStats,
    batch_bottleneck_metrics,
    bootstrap_ci,
    bottleneck_core,
    bottleneck_metrics,
    bottleneck_report,
    bottleneck_stats,
    group_pearson,
    rollout_scores,
)
from actfocus_jax.analysis.gradients import (
    GRADIENT_SCOPES,
    RoleGradientStats,
    grouped_role_gradient_stats,
    role_gradient_stats,
    role_gradients,
    surrogate_loss,
)

__all__ = [
    "ANALYSIS_ROLES",
    "GRADIENT_SCOPES",
    "ROLE_NAMES",
    "VARIANTS",
    "BottleneckStats",
    "RoleGradientStats",
    "advantage_by_turn",
    "batch_bottleneck_metrics",
    "bootstrap_ci",
    "bottleneck_core",
    "bottleneck_metrics",
    "bottleneck_report",
    "bottleneck_stats",
    "group_pearson",
    "grouped_role_gradient_stats",
    "role_gradient_stats",
    "role_gradients",
    "rollout_scores",
    "surrogate_loss",
]
