"""Plain float64 NumPy / Python reference implementations of the RL maths (tests only).

Written independently of the JAX code, with explicit loops where that makes the definition obvious
(DESIGN.md sections 4 and 5). Every function takes and returns NumPy arrays / Python floats.
"""

from __future__ import annotations

import math

import numpy as np

PROMPT, REASONING, ACTION, PAD = 0, 1, 2, 3
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


def grpo_advantages(rewards, group_size, *, normalize_std=True, leave_one_out=False, eps=1e-6):
    rewards = [float(r) for r in np.asarray(rewards, np.float64)]
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        g = len(group)
        mean = sum(group) / g
        var = sum((r - mean) ** 2 for r in group) / (g - 1)
        std = math.sqrt(var)
        for i, r in enumerate(group):
            if leave_one_out:
                others = [group[j] for j in range(g) if j != i]
                a = r - sum(others) / len(others)
            else:
                a = r - mean
            if normalize_std:
                a = a / (std + eps)
            out.append(a)
    return np.array(out, np.float64)


def grpo_turn_advantages(rewards, turn_ids, mask, group_size, *, normalize_std=True, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    turn_ids = np.asarray(turn_ids)
    mask = np.asarray(mask).astype(bool)
    out = np.zeros(turn_ids.shape, np.float64)
    for start in range(0, len(rewards), group_size):
        idx = range(start, start + group_size)
        group = [rewards[i] for i in idx]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i in idx:
            for pos in range(turn_ids.shape[1]):
                if not mask[i, pos]:
                    continue
                t = turn_ids[i, pos]
                reached = [rewards[j] for j in idx if np.any(mask[j] & (turn_ids[j] == t))]
                a = rewards[i] - sum(reached) / len(reached)
                out[i, pos] = a / (std + eps) if normalize_std else a
    return out


def gae(rewards, values, mask, *, gamma, lam):
    rewards = np.asarray(rewards, np.float64)
    values = np.asarray(values, np.float64)
    mask = np.asarray(mask).astype(bool)
    adv = np.zeros(rewards.shape, np.float64)
    ret = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value = 0.0
        next_adv = 0.0
        for t in reversed(positions):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            a = delta + gamma * lam * next_adv
            adv[b, t] = a
            ret[b, t] = a + values[b, t]
            next_value = values[b, t]
            next_adv = a
    return adv, ret


def turn_rewards_to_tokens(turn_rewards, turn_ids, mask):
    turn_rewards = np.asarray(turn_rewards, np.float64)
    out = np.zeros(np.shape(mask), np.float64)
    for b in range(out.shape[0]):
        for k in range(turn_rewards.shape[1]):
            last = None
            for t in range(out.shape[1]):
                if mask[b, t] and turn_ids[b, t] == k:
                    last = t
            if last is not None:
                out[b, last] += turn_rewards[b, k]
    return out


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    vals = [float(v) for v, m in zip(np.ravel(x), np.ravel(mask)) if m]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    sq = sum((v - mean) ** 2 for v in vals)
    var = sq / (n - 1) if n > 1 else sq
    out = np.zeros(np.shape(x), np.float64)
    for idx in np.ndindex(*np.shape(x)):
        if mask[idx]:
            v = (float(x[idx]) - mean) / math.sqrt(var + eps)
            out[idx] = v if shift_mean else v + mean
    return out


def masked_group_center(x, mask, group_size):
    """Each group's rows (group after group) minus the mean over the group's masked entries."""
    out = np.zeros(np.shape(x), np.float64)
    for g in range(np.shape(x)[0] // group_size):
        rows = range(g * group_size, (g + 1) * group_size)
        vals = [float(x[b][t]) for b in rows for t in range(np.shape(x)[1]) if mask[b][t]]
        mean = sum(vals) / len(vals) if vals else 0.0
        for b in rows:
            for t in range(np.shape(x)[1]):
                if mask[b][t]:
                    out[b, t] = float(x[b][t]) - mean
    return out


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def aggregate(per_token, mask, mode, *, norm_length=None):
    per_token = np.asarray(per_token, np.float64)
    mask = np.asarray(mask).astype(bool)
    bsz, length = per_token.shape
    if mode == "token-mean":
        total, count = 0.0, 0
        for b in range(bsz):
            for t in range(length):
                if mask[b, t]:
                    total += per_token[b, t]
                    count += 1
        return total / count if count else 0.0
    seq_losses = []
    for b in range(bsz):
        s = sum(per_token[b, t] for t in range(length) if mask[b, t])
        n = sum(1 for t in range(length) if mask[b, t])
        if mode == "seq-mean-token-mean":
            seq_losses.append(s / n if n else 0.0)
        elif mode == "seq-mean-token-sum":
            seq_losses.append(s)
        elif mode == "seq-mean-token-sum-norm":
            seq_losses.append(s / (length if norm_length is None else norm_length))
        else:
            raise ValueError(mode)
    return sum(seq_losses) / bsz


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    weights=None,
    clip_low=0.2,
    clip_high=0.2,
    loss_agg="token-mean",
    dual_clip=None,
    loss_agg_norm=None,
):
    """Returns ``(loss, per_token_pg, ratio, clip_frac, clip_frac_lower)``."""
    logp = np.asarray(logp, np.float64)
    old_logp = np.asarray(old_logp, np.float64)
    advantages = np.asarray(advantages, np.float64)
    mask = np.asarray(mask).astype(bool)
    bsz, length = logp.shape
    pg = np.zeros((bsz, length))
    ratio = np.ones((bsz, length))
    n_tok = n_clip = n_dual = 0
    for b in range(bsz):
        for t in range(length):
            if not mask[b, t]:
                continue
            n_tok += 1
            lr = min(max(logp[b, t] - old_logp[b, t], -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            r = math.exp(lr)
            ratio[b, t] = r
            a = advantages[b, t]
            unclipped = -a * r
            clipped = -a * min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            if clipped > unclipped:
                n_clip += 1
            loss = max(unclipped, clipped)
            if dual_clip is not None and a < 0:
                cap = -a * dual_clip
                if loss > cap:
                    n_dual += 1
                    loss = cap
            pg[b, t] = loss
    weighted = pg if weights is None else pg * np.asarray(weights, np.float64)
    total = aggregate(weighted, mask, loss_agg, norm_length=loss_agg_norm)
    clip_frac = n_clip / n_tok if n_tok else 0.0
    dual_frac = n_dual / n_tok if n_tok else 0.0
    return total, pg, ratio, clip_frac, dual_frac


def kl_penalty(logp, ref_logp, kind, *, clamp=None):
    logp = np.asarray(logp, np.float64)
    ref_logp = np.asarray(ref_logp, np.float64)
    out = np.zeros(logp.shape)
    for idx in np.ndindex(*logp.shape):
        log_r = ref_logp[idx] - logp[idx]
        if kind == "k1":
            v = -log_r
        elif kind == "k2":
            v = 0.5 * log_r * log_r
        elif kind == "k3":
            log_r = min(max(log_r, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            v = math.exp(log_r) - log_r - 1.0
        else:
            raise ValueError(kind)
        if clamp is not None:
            v = min(max(v, -clamp), clamp)
        out[idx] = v
    return out


def value_loss(values, old_values, returns, mask, *, clip_range, loss_agg="token-mean"):
    """Returns ``(loss, per_token, clip_frac)``."""
    values = np.asarray(values, np.float64)
    old_values = np.asarray(old_values, np.float64)
    returns = np.asarray(returns, np.float64)
    mask = np.asarray(mask).astype(bool)
    per_token = np.zeros(values.shape)
    n_tok = n_clip = 0
    for idx in np.ndindex(*values.shape):
        if not mask[idx]:
            continue
        n_tok += 1
        v, old, r = values[idx], old_values[idx], returns[idx]
        l1 = (v - r) ** 2
        if clip_range is None:
            per_token[idx] = 0.5 * l1
            continue
        v_clip = min(max(v, old - clip_range), old + clip_range)
        l2 = (v_clip - r) ** 2
        if l2 > l1:
            n_clip += 1
        per_token[idx] = 0.5 * max(l1, l2)
    return aggregate(per_token, mask, loss_agg), per_token, (n_clip / n_tok if n_tok else 0.0)


# ----------------------------------------------------------------------------------------------
# ActFocus
# ----------------------------------------------------------------------------------------------


def token_weights(
    roles, energies, turn_ids, *, alpha, beta, tau, w_max, scope, normalize, return_raw=False
):
    """DESIGN.md section 4, one trajectory and one softmax scope at a time."""
    roles = np.asarray(roles)
    energies = np.asarray(energies, np.float64)
    bsz, length = roles.shape
    weights = np.zeros((bsz, length), np.float64)
    raw = np.zeros((bsz, length), np.float64)
    for b in range(bsz):
        # Group the action positions of this trajectory by softmax scope.
        scopes: dict[int, list[int]] = {}
        for t in range(length):
            if roles[b, t] == ACTION:
                key = 0 if scope == "trajectory" else int(turn_ids[b, t])
                scopes.setdefault(key, []).append(t)
        for positions in scopes.values():
            n_a = len(positions)
            logits = [energies[b, t] / tau for t in positions]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            z = sum(exps)
            for t, e in zip(positions, exps):
                r = (1.0 - beta) + beta * n_a * e / z
                raw[b, t] = r
                weights[b, t] = min(max(r, 0.0), w_max)
        for t in range(length):
            if roles[b, t] == REASONING:
                weights[b, t] = alpha
        if normalize == "preserve_sum":
            gen = [t for t in range(length) if roles[b, t] in (REASONING, ACTION)]
            mass = sum(weights[b, t] for t in gen)
            if mass > 0:
                for t in gen:
                    weights[b, t] *= len(gen) / mass
    if return_raw:
        return weights, raw
    return weights


# ----------------------------------------------------------------------------------------------
# Random test data
# ----------------------------------------------------------------------------------------------


def random_trajectories(rng, batch, length, *, max_turns=3, layout=True):
    """Random ``(roles, turn_ids)`` int arrays ``[batch, length]``.

    With ``layout=True`` rows look like real episodes: a prompt, then turns of
    ``[reasoning...][action...]`` separated by observation (PROMPT) tokens, then PAD; turn ids count
    the responses (observation tokens carry the id of the following turn). Otherwise roles and
    turn ids are i.i.d. uniform.
    """
    if not layout:
        roles = rng.integers(0, 4, size=(batch, length))
        turn_ids = rng.integers(0, max_turns, size=(batch, length))
        return roles.astype(np.int8), turn_ids.astype(np.int32)
    roles = np.full((batch, length), PAD, np.int8)
    turn_ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        t = 0
        turn = 0
        end = int(rng.integers(length // 2, length + 1))
        while t < end and turn < max_turns:
            for _ in range(int(rng.integers(0 if turn else 1, 4))):  # prompt / observation
                if t < end:
                    roles[b, t], turn_ids[b, t] = PROMPT, turn
                    t += 1
            for _ in range(int(rng.integers(0, 5))):  # reasoning
                if t < end:
                    roles[b, t], turn_ids[b, t] = REASONING, turn
                    t += 1
            for _ in range(int(rng.integers(0, 4))):  # action
                if t < end:
                    roles[b, t], turn_ids[b, t] = ACTION, turn
                    t += 1
            turn += 1
        turn_ids[b, t:] = max(turn - 1, 0)
    return roles, turn_ids
