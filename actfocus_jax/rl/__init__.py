"""actfocus_jax.rl: advantages, losses and ActFocus token weights.

* :mod:`actfocus_jax.rl.advantages`: GRPO / Dr. GRPO / RLOO episode advantages, token-level GAE.
* :mod:`actfocus_jax.rl.losses`: clipped policy surrogate, loss aggregation, KL / entropy / value
  losses.
* :mod:`actfocus_jax.rl.actfocus`: ActFocus token energies and weights.
"""

from actfocus_jax.rl.actfocus import (
    ActFocusConfig,
    ActFocusStats,
    actfocus_weights,
    token_energies,
    token_weights,
    token_weights_and_stats,
)
from actfocus_jax.rl.advantages import (
    broadcast_to_tokens,
    episode_rewards_to_tokens,
    gae,
    grpo_advantages,
    grpo_turn_advantages,
    masked_group_center,
    masked_mean,
    masked_var,
    masked_whiten,
    turn_rewards_to_tokens,
)
from actfocus_jax.rl.losses import (
    LOSS_AGG_MODES,
    PolicyLossMetrics,
    ValueLossMetrics,
    aggregate,
    entropy_loss,
    kl_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)

__all__ = [
    "LOSS_AGG_MODES",
    "ActFocusConfig",
    "ActFocusStats",
    "PolicyLossMetrics",
    "ValueLossMetrics",
    "actfocus_weights",
    "aggregate",
    "broadcast_to_tokens",
    "entropy_loss",
    "episode_rewards_to_tokens",
    "gae",
    "grpo_advantages",
    "grpo_turn_advantages",
    "kl_loss",
    "kl_penalty",
    "masked_group_center",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_energies",
    "token_weights",
    "token_weights_and_stats",
    "turn_rewards_to_tokens",
    "value_loss",
]
