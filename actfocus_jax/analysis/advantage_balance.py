"""Where the advantage lands: mean token advantage per turn and role, for both GRPO baselines.

In a multi-turn episode that ends on success, the later turns are played mostly by the episodes
that have not succeeded yet. With GRPO's episode-level group mean as the baseline, the tokens of
those turns then carry a net negative advantage whatever they are (templates, state descriptions
that are right), and the update pushes them down. :func:`advantage_by_turn` measures that on a
rollout buffer, next to the per-turn baseline of
:func:`~actfocus_jax.rl.advantages.grpo_turn_advantages` that removes it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from actfocus_jax.analysis.bottleneck import buffer_field
from actfocus_jax.rl.advantages import grpo_advantages, grpo_turn_advantages
from actfocus_jax.rollout.roles import Role

__all__ = ["advantage_by_turn"]

_ROLES = {"reasoning": int(Role.REASONING), "action": int(Role.ACTION)}


def advantage_by_turn(
    buf: Any, group_size: int, *, num_turns: int | None = None, normalize_std: bool = True
) -> dict[str, Any]:
    """Token share and mean token advantage per turn and role under both GRPO baselines.

    Args:
      buf: a rollout buffer or a mapping of its arrays (``episode_return``, ``turn_ids``,
        ``roles``, ``generated``; rows laid out group after group).
      group_size: rollouts per group.
      num_turns: turns to report (default: ``turn_rewards.shape[1]``, else the largest turn id + 1).
      normalize_std: GRPO's division by the group std (both baselines).

    Returns:
      ``{"episode": table, "turn": table}`` where each table has ``"all"`` (mean advantage over
      all generated tokens, i.e. the net push of a token-mean loss) and ``"turns"``: one entry per
      turn with ``{"<role>": {"share": fraction of all generated tokens, "mean": mean advantage}}``
      (``mean`` is None for a role/turn with no tokens).
    """
    fields = {k: buffer_field(buf, k) for k in ("generated", "turn_ids", "roles", "episode_return")}
    if missing := [k for k, v in fields.items() if v is None]:
        raise ValueError(f"advantage_by_turn needs the rollout arrays {missing}")
    mask = np.asarray(fields["generated"]).astype(bool)
    turn_ids = np.asarray(fields["turn_ids"])
    roles = np.asarray(fields["roles"])
    ret = jnp.asarray(np.asarray(fields["episode_return"], np.float32))
    if num_turns is None:
        turn_rewards = buffer_field(buf, "turn_rewards")
        num_turns = (
            int(np.shape(turn_rewards)[1]) if turn_rewards is not None else int(turn_ids.max()) + 1
        )
    ep = np.asarray(grpo_advantages(ret, group_size, normalize_std=normalize_std))
    tables = {
        "episode": np.where(mask, ep[:, None], 0.0),
        "turn": np.asarray(
            grpo_turn_advantages(
                ret,
                jnp.asarray(turn_ids),
                jnp.asarray(mask),
                group_size,
                normalize_std=normalize_std,
            )
        ),
    }
    total = max(int(mask.sum()), 1)
    out = {}
    for name, adv in tables.items():
        turns = []
        for t in range(num_turns):
            row = {}
            for role, code in _ROLES.items():
                sel = mask & (turn_ids == t) & (roles == code)
                n = int(sel.sum())
                row[role] = {
                    "share": n / total,
                    "mean": float(adv[sel].mean()) if n else None,
                }
            turns.append(row)
        out[name] = {"all": float(adv[mask].mean()) if mask.any() else None, "turns": turns}
    return out
