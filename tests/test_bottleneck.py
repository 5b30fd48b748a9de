"""Action Bottleneck analysis: per-group Pearson vs a float64 loop reference, degenerate groups,
bootstrap coverage, synthetic constructions with a known answer, per-turn consistency, and the
gradient variant on a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax import analysis
from actfocus_jax.analysis import bottleneck as bn
from actfocus_jax.rollout import Role
from actfocus_jax.rollout.buffer import RolloutBuffer

P, R, A, PAD = int(Role.PROMPT), int(Role.REASONING), int(Role.ACTION), int(Role.PAD)


# ------------------------------------------------------------------------------------ synthetic data
def synthetic(
    seed,
    *,
    n_groups=8,
    group_size=6,
    n_turns=1,
    reason_len=(6, 12),
    action_len=(1, 4),
    target="action",
    noise=0.3,
    constant_groups=(),
    no_action_rows=(),
):
    """Rows ``[prompt] ([obs] [reasoning] [action])*T [pad]`` with energies ~ Exp(1).

    ``target``: the reward is ``S^target`` (sum of the target role's energies) + Gaussian noise;
    ``"none"``: rewards independent of energies. ``constant_groups`` get a constant reward;
    rows in ``no_action_rows`` have no action tokens.
    """
    rng = np.random.default_rng(seed)
    b = n_groups * group_size
    rows = []
    for i in range(b):
        roles, turns = [P] * 3, [0] * 3
        for t in range(n_turns):
            nr = rng.integers(reason_len[0], reason_len[1] + 1)
            na = 0 if i in no_action_rows else rng.integers(action_len[0], action_len[1] + 1)
            roles += [P] * 2 + [R] * nr + [A] * na
            turns += [t] * (2 + nr + na)
        rows.append((roles, turns))
    length = max(len(r) for r, _ in rows) + 2
    roles = np.full((b, length), PAD, np.int8)
    turn_ids = np.full((b, length), -1, np.int32)
    for i, (r, t) in enumerate(rows):
        roles[i, : len(r)] = r
        turn_ids[i, : len(t)] = t
    gen = (roles == R) | (roles == A)
    energies = np.where(gen, rng.exponential(1.0, (b, length)), 0.0).astype(np.float32)
    s_r = np.where(roles == R, energies, 0).sum(1)
    s_a = np.where(roles == A, energies, 0).sum(1)
    base = {"action": s_a, "reasoning": s_r, "none": np.zeros(b)}[target]
    rewards = base + noise * rng.standard_normal(b)
    for g in constant_groups:
        rewards[g * group_size : (g + 1) * group_size] = 1.0
    return dict(
        roles=roles,
        turn_ids=turn_ids,
        old_logp=-energies,
        entropy=energies * 0.5 + 0.1,
        logit=-energies + 2.0,
        episode_return=rewards.astype(np.float32),
        group_id=np.repeat(np.arange(n_groups), group_size).astype(np.int32),
    )


# ------------------------------------------------------------------------------ float64 reference
def ref_pearson(x, y):
    n = len(x)
    if n < 2 or max(x) == min(x) or max(y) == min(y):
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def ref_stats(data, group_size, variant, energy_key="old_logp", sign=-1.0):
    """Per-group rho, eligibility, mean|rho|, share, density with plain loops in float64."""
    roles = np.asarray(data["roles"])
    e = sign * np.asarray(data[energy_key], np.float64)
    rew = np.asarray(data["episode_return"], np.float64)
    b, length = roles.shape
    rho, elig = [], []
    tok = [0.0, 0.0]
    gen_tot = 0.0
    for g in range(b // group_size):
        rows = range(g * group_size, (g + 1) * group_size)
        rr = [rew[i] for i in rows]
        eligible = max(rr) > min(rr)
        elig.append(eligible)
        rho_g = []
        for k, role in enumerate((R, A)):
            xs, ys = [], []
            for i in rows:
                vals = [e[i, j] for j in range(length) if roles[i, j] == role]
                if variant == "sum":
                    xs.append(sum(vals))
                    ys.append(rew[i])
                elif vals:
                    xs.append(sum(vals) / len(vals))
                    ys.append(rew[i])
                if eligible:
                    tok[k] += len(vals)
            rho_g.append(ref_pearson(xs, ys) if eligible else 0.0)
        if eligible:
            gen_tot += sum(1 for i in rows for j in range(length) if roles[i, j] in (R, A))
        rho.append(rho_g)
    rho, elig = np.array(rho), np.array(elig)
    n = elig.sum()
    mean_abs = np.abs(rho[elig]).mean(0) if n else np.zeros(2)
    share = np.array(tok) / gen_tot if gen_tot else np.zeros(2)
    return rho, elig, mean_abs, share, mean_abs / share


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("variant", ["sum", "mean"])
def test_pearson_matches_float64_reference(variant):
    data = synthetic(
        0, n_groups=7, group_size=5, target="none", constant_groups=(2,), no_action_rows=(5, 6, 7)
    )
    st = analysis.bottleneck_stats(data, 5, energy="neg_logprob", variant=variant)
    rho, elig, mean_abs, share, dens = ref_stats(data, 5, variant)
    np.testing.assert_array_equal(np.asarray(st.eligible), elig)
    np.testing.assert_allclose(np.asarray(st.rho), rho, atol=2e-5)
    np.testing.assert_allclose(st.mean_abs_rho, mean_abs, atol=2e-5)
    np.testing.assert_allclose(st.share, share, rtol=1e-6)
    np.testing.assert_allclose(st.density, dens, rtol=1e-4)
    assert int(st.n_groups) == 6
    # The other energies: entropy (as recorded) and neg_logit.
    st_e = analysis.bottleneck_stats(data, 5, energy="entropy", variant=variant)
    np.testing.assert_allclose(st_e.rho, ref_stats(data, 5, variant, "entropy", 1.0)[0], atol=2e-5)
    st_l = analysis.bottleneck_stats(data, 5, energy="neg_logit", variant=variant)
    np.testing.assert_allclose(st_l.rho, ref_stats(data, 5, variant, "logit", -1.0)[0], atol=2e-5)


def test_zero_reward_variance_groups_are_excluded():
    data = synthetic(1, n_groups=4, group_size=4, target="action", constant_groups=(0, 3))
    st = analysis.bottleneck_stats(data, 4)
    np.testing.assert_array_equal(np.asarray(st.eligible), [False, True, True, False])
    assert int(st.n_groups) == 2
    np.testing.assert_array_equal(np.asarray(st.rho)[[0, 3]], 0.0)
    expect = np.abs(np.asarray(st.rho)[1:3]).mean(0)
    np.testing.assert_allclose(st.mean_abs_rho, expect, rtol=1e-6)
    # Share counts only eligible groups' tokens.
    roles = data["roles"][4:12]
    gen = np.isin(roles, (R, A)).sum()
    np.testing.assert_allclose(st.share[1], (roles == A).sum() / gen, rtol=1e-6)
    # No eligible group at all: zeros, no NaN.
    data["episode_return"][:] = 3.0
    st0 = analysis.bottleneck_stats(data, 4)
    assert int(st0.n_groups) == 0
    for x in (st0.mean_abs_rho, st0.share, st0.density, st0.rho):
        assert np.all(np.asarray(x) == 0)


def test_zero_variance_scores_give_zero_not_nan():
    for variant in ("sum", "mean"):
        data = synthetic(2, n_groups=3, group_size=4, target="none")
        e = -data["old_logp"]
        # Group 0: S^A constant across rollouts (equal up to float32 rounding of the sums).
        for i in range(4):
            a = data["roles"][i] == A
            e[i, a] = 2.0 / a.sum() if variant == "sum" else 0.7
        # Group 1: no action tokens at all -> S^A = 0 for all rows (sum), no participants (mean).
        data["roles"][4:8][data["roles"][4:8] == A] = R
        data["old_logp"] = -e
        st = analysis.bottleneck_stats(data, 4, variant=variant)
        rho = np.asarray(st.rho)
        assert np.all(np.isfinite(rho)) and np.all(np.isfinite(np.asarray(st.density)))
        assert rho[0, 1] == 0 and rho[1, 1] == 0
        assert bool(st.degenerate[0, 1]) and bool(st.degenerate[1, 1])
        assert not bool(st.degenerate[2, 1]) and rho[2, 1] != 0
        assert int(st.n_degenerate[1]) == 2 and int(st.n_groups) == 3
    # group_pearson directly: constant x, constant y, a single participant, a huge scale.
    x = jnp.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1e30, 2e30, 3e30]])
    y = jnp.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    w = jnp.array([[True] * 3, [True] * 3, [True, False, False], [True] * 3])
    rho, ok = analysis.group_pearson(x, y, w)
    np.testing.assert_array_equal(np.asarray(ok), [False, False, False, True])
    np.testing.assert_allclose(np.asarray(rho), [0, 0, 0, 1], atol=1e-6)


def test_jit_and_buffer_like_input():
    data = synthetic(3, n_groups=4, group_size=4)
    st = analysis.bottleneck_stats(data, 4)
    f = jax.jit(lambda r, e, y: analysis.bottleneck_metrics(r, e, y, group_size=4))
    m = f(jnp.asarray(data["roles"]), -jnp.asarray(data["old_logp"]), data["episode_return"])
    np.testing.assert_allclose(m["action_mean_abs_rho"], st.mean_abs_rho[1], rtol=1e-6)
    logged = analysis.batch_bottleneck_metrics(data, 4)
    assert set(logged) >= {"bottleneck/action_density", "bottleneck/reasoning_share"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in logged.values())
    # A RolloutBuffer (attribute access) gives the same statistics as the dict.
    b, length = data["roles"].shape
    zeros_bl, zeros_b = np.zeros((b, length), np.float32), np.zeros((b,), np.int32)
    buf = RolloutBuffer(
        tokens=np.zeros((b, length), np.int32),
        roles=data["roles"],
        turn_ids=data["turn_ids"],
        generated=np.isin(data["roles"], (R, A)),
        old_logp=data["old_logp"],
        entropy=data["entropy"],
        logit=data["logit"],
        length=(data["roles"] != PAD).sum(1).astype(np.int32),
        turn_rewards=zeros_bl[:, :1],
        reward_pos=np.zeros((b, 1), np.int32),
        episode_return=data["episode_return"],
        success=zeros_b.astype(bool),
        done=zeros_b.astype(bool),
        num_turns=zeros_b + 1,
        num_actions=zeros_b,
        invalid_actions=zeros_b,
        truncated=zeros_b.astype(bool),
        truncated_responses=zeros_b,
        group_id=data["group_id"],
        task_id=data["group_id"],
    )
    st_buf = analysis.bottleneck_stats(buf, 4, energy="entropy")
    st_dict = analysis.bottleneck_stats(data, 4, energy="entropy")
    np.testing.assert_allclose(st_buf.rho, st_dict.rho)
    bad = dict(data, group_id=np.arange(16))
    with pytest.raises(ValueError, match="group after group"):
        analysis.bottleneck_stats(bad, 4)
    with pytest.raises(ValueError, match="multiple"):
        analysis.bottleneck_stats(data, 5)


def test_bootstrap_ci_coverage():
    """Over many datasets from N(mu, 1), the 95% CI for the mean covers mu in ~95% of trials."""
    rng = np.random.default_rng(0)
    mu, trials, n = 0.7, 300, 60
    hits = 0
    for trial in range(trials):
        x = mu + rng.standard_normal(n)
        lo, hi = analysis.bootstrap_ci(x, num_resamples=400, seed=trial)
        hits += lo <= mu <= hi
    coverage = hits / trials
    print(f"bootstrap 95% CI coverage: {coverage:.3f}")
    assert 0.88 <= coverage <= 0.985
    lo, hi = analysis.bootstrap_ci(np.zeros((0,)))
    assert np.isnan(lo) and np.isnan(hi)
    lo, hi = analysis.bootstrap_ci(np.ones(5))
    assert lo == hi == 1.0


@pytest.mark.parametrize("target", ["action", "reasoning"])
def test_synthetic_bottleneck_is_found(target):
    """r = S^target + noise (the other role's energies independent): the statistic must find it."""
    data = synthetic(10, n_groups=48, group_size=8, target=target, noise=0.3)
    rep = analysis.bottleneck_report(
        data, 8, energies=("neg_logprob",), variants=("sum",), num_resamples=500, per_turn=False
    )["neg_logprob"]["sum"]
    ra, rr = rep["action"], rep["reasoning"]
    print(
        f"\n[{target}] mean|rho| A={ra['mean_abs_rho']:.3f} {ra['mean_abs_rho_ci']} "
        f"R={rr['mean_abs_rho']:.3f} {rr['mean_abs_rho_ci']}; share A={ra['share']:.3f} "
        f"R={rr['share']:.3f}; density A={ra['density']:.2f} R={rr['density']:.2f}; "
        f"null A={ra['null_mean_abs_rho']:.3f} R={rr['null_mean_abs_rho']:.3f}; "
        f"excess density A={ra['excess_density']:.2f} R={rr['excess_density']:.2f}"
    )
    hi_role, lo_role = (ra, rr) if target == "action" else (rr, ra)
    assert hi_role["mean_abs_rho"] > 0.75
    assert lo_role["mean_abs_rho"] < 0.45
    assert hi_role["mean_abs_rho_ci"][0] > lo_role["mean_abs_rho_ci"][1]  # CIs separated
    assert hi_role["excess_density"] > 3 * max(lo_role["excess_density"], 0.05)
    lo_ci, hi_ci = rep["action_minus_reasoning_mean_abs_rho_ci"]
    assert (lo_ci > 0) if target == "action" else (hi_ci < 0)
    if target == "action":  # rare tokens carrying the signal: density far above
        assert ra["density"] > 5 * rr["density"]
        assert ra["density_ci"][0] > rr["density_ci"][1]
    for role in (ra, rr):
        lo, hi = role["mean_abs_rho_ci"]
        assert lo <= role["mean_abs_rho"] <= hi
        lo, hi = role["density_ci"]
        assert lo <= role["density"] <= hi


def test_per_turn_matches_full_on_single_turn_data():
    data = synthetic(4, n_groups=6, group_size=4, target="action", constant_groups=(1,))
    for variant in ("sum", "mean"):
        st = analysis.bottleneck_stats(data, 4, variant=variant, per_turn=True)
        pt = st.per_turn
        assert np.shape(pt.rho) == (1, 6, 2)
        for name in ("rho", "eligible", "mean_abs_rho", "share", "density", "n_groups"):
            np.testing.assert_allclose(
                np.asarray(getattr(pt, name))[0], np.asarray(getattr(st, name)), rtol=1e-6
            )


def test_per_turn_localises_signal_and_report():
    """Three turns; the reward depends on turn 1's action energies only."""
    data = synthetic(5, n_groups=24, group_size=6, n_turns=3, target="none", noise=0.0)
    e = -data["old_logp"]
    mask = (data["roles"] == A) & (data["turn_ids"] == 1)
    rng = np.random.default_rng(0)
    data["episode_return"] = (
        np.where(mask, e, 0).sum(1) + 0.2 * rng.standard_normal(len(e))
    ).astype(np.float32)
    st = analysis.bottleneck_stats(data, 6, per_turn=True)
    m = np.asarray(st.per_turn.mean_abs_rho)  # [T, 2]
    print(f"\nper-turn mean|rho| (R, A): {np.round(m, 3).tolist()}")
    assert m[1, 1] > 0.8 and m[0, 1] < 0.55 and m[2, 1] < 0.55
    rep = analysis.bottleneck_report(data, 6, num_resamples=100, num_permutations=10)
    assert rep["skipped"] == []
    assert set(rep) >= {"neg_logprob", "entropy", "neg_logit"}
    turns = rep["neg_logprob"]["sum"]["per_turn"]
    assert [t["turn"] for t in turns] == [0, 1, 2]
    assert turns[1]["action"]["mean_abs_rho"] == pytest.approx(m[1, 1], rel=1e-6)


# -------------------------------------------------------------------------------- gradient variant
@pytest.fixture(scope="module")
def tiny_policy():
    from flax import nnx

    from actfocus_jax.models import get_config, init_model

    cfg = get_config(
        "tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64
    )
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    return cfg, graphdef, params


def _grad_batch(vocab, *, no_action=False, seed=0):
    rng = np.random.default_rng(seed)
    b, length = 4, 14
    roles = np.full((b, length), P, np.int8)
    roles[:, 4:10] = R
    roles[:, 10:13] = A
    roles[:, 13] = PAD
    roles[1, 12:] = PAD
    if no_action:
        roles[roles == A] = R
    valid = roles != PAD
    tokens = np.where(valid, rng.integers(1, vocab, (b, length)), 0).astype(np.int32)
    adv = np.repeat(rng.standard_normal((b, 1)), length, 1).astype(np.float32)
    return tokens, valid, roles, adv


def _tree_norm(t):
    return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(t))))


def test_role_gradients_are_linear_and_match_jax_grad(tiny_policy):
    cfg, graphdef, params = tiny_policy
    tokens, valid, roles, adv = _grad_batch(cfg.vocab_size)
    g = analysis.role_gradients(graphdef, params, tokens, valid, roles, adv)
    resid = jax.tree.map(lambda f, r, a: f - r - a, g["full"], g["reasoning"], g["action"])
    full = _tree_norm(g["full"])
    assert full > 0 and _tree_norm(resid) <= 1e-5 * full + 1e-8
    # Same as jax.grad of the role-masked surrogate (ratio at 1, and the importance ratio with
    # arbitrary old log-probs), one compiled program for both.
    old = np.where(valid, -2.0 + 0.3 * np.random.default_rng(1).standard_normal(valid.shape), 0.0)
    old = old.astype(np.float32)

    @jax.jit
    def direct(p):
        grad = jax.grad(analysis.surrogate_loss)
        kw = dict(role=Role.ACTION)
        return (
            grad(p, graphdef, tokens, valid, roles, adv, **kw),
            grad(p, graphdef, tokens, valid, roles, adv, old, ratio="importance", **kw),
        )

    ga, ga_imp = direct(params)
    g_imp = analysis.role_gradients(
        graphdef, params, tokens, valid, roles, adv, old, ratio="importance"
    )
    for want, got in ((ga, g["action"]), (ga_imp, g_imp["action"])):
        diff = jax.tree.map(lambda x, y: x - y, want, got)
        assert _tree_norm(diff) <= 1e-5 * _tree_norm(want)
    assert abs(_tree_norm(ga_imp) - _tree_norm(ga)) > 1e-3 * _tree_norm(ga)  # modes differ
    st = analysis.role_gradient_stats(graphdef, params, tokens, valid, roles, adv)
    print(
        f"\ngrad norms full={float(st.full_norm):.3e} R={float(st.norm[0]):.3e} "
        f"A={float(st.norm[1]):.3e}; cos={np.round(np.asarray(st.cosine), 3).tolist()}; "
        f"per-token={np.asarray(st.norm_per_token).tolist()}"
    )
    assert float(st.linearity_error) < 1e-5
    np.testing.assert_allclose(float(st.full_norm), full, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(st.contribution)), 1.0, atol=1e-5)
    np.testing.assert_allclose(st.num_tokens, [24, 11])
    np.testing.assert_allclose(st.norm_per_token, np.asarray(st.norm) / [24, 11], rtol=1e-6)
    # Per-group statistics (2 groups of 2 rows; each normalised by its own token count).
    sg = analysis.role_gradient_stats(graphdef, params, tokens, valid, roles, adv, group_size=2)
    assert np.shape(sg.norm) == (2, 2) and np.all(np.asarray(sg.linearity_error) < 1e-5)
    np.testing.assert_allclose(sg.num_tokens, [[12, 5], [12, 6]])


def check_rollout_sized_role_gradients():
    """Role gradients of an 8 x 264 batch (a Sokoban group's shape, d_model 128) equal
    ``jax.grad`` of the role-masked surrogate and add up to the full gradient."""
    from flax import nnx

    from actfocus_jax.models import get_config, init_model

    cfg = get_config("tiny", n_layers=1, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32)
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    b, length = 8, 264
    roles = rng.choice(np.array([P, R, A], np.int8), size=(b, length))
    valid = np.ones((b, length), bool)
    tokens = rng.integers(1, cfg.vocab_size, (b, length)).astype(np.int32)
    adv = np.repeat(rng.standard_normal((b, 1)), length, 1).astype(np.float32)
    g = analysis.role_gradients(graphdef, params, tokens, valid, roles, adv)
    grad = jax.jit(jax.grad(analysis.surrogate_loss), static_argnums=1, static_argnames="role")
    for name, role in (("full", None), ("reasoning", Role.REASONING), ("action", Role.ACTION)):
        want = grad(params, graphdef, tokens, valid, roles, adv, role=role)
        diff = jax.tree.map(lambda x, y: x - y, want, g[name])
        assert _tree_norm(diff) <= 1e-4 * _tree_norm(want), name
    st = analysis.role_gradient_stats(graphdef, params, tokens, valid, roles, adv)
    assert float(st.linearity_error) < 1e-5


@pytest.mark.parametrize("ynn", ["off", "on"])
def test_role_gradients_match_jax_grad_at_a_rollout_sized_batch(ynn):
    """:func:`check_rollout_sized_role_gradients` with the suite's flags (YNNPACK fusions off) and,
    in a subprocess, with XLA:CPU's default flags, which users get. Regression for the latter:
    computed with ``jax.vmap`` over the three cotangents, jaxlib 0.10.2's YNNPACK fusions
    miscompiled the pullback at this size (the reasoning and action gradients off by 10-30%, their
    sum no longer the full one), while the tiny batches of the other tests came out right."""
    if ynn == "off":
        check_rollout_sized_role_gradients()
        return
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    code = (
        "import jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
        "import test_bottleneck as t; t.check_rollout_sized_role_gradients()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_grouped_role_gradients_match_per_group_and_whole_batch(tiny_policy):
    """``grouped_role_gradient_stats``: its per-group statistics are ``role_gradient_stats`` of
    each group's rows on their own, and its batch statistics (assembled from the groups' gradients
    weighted by their generated-token counts) those of the whole batch computed directly."""
    cfg, graphdef, params = tiny_policy
    tokens, valid, roles, adv = _grad_batch(cfg.vocab_size)
    per_group, batch = analysis.grouped_role_gradient_stats(
        graphdef, params, tokens, valid, roles, adv, group_size=2
    )
    groups = [
        analysis.role_gradient_stats(
            graphdef, params, *(x[g : g + 2] for x in (tokens, valid, roles, adv))
        )
        for g in (0, 2)
    ]
    want_g = jax.tree.map(lambda *xs: np.stack(xs), *groups)
    want_b = analysis.role_gradient_stats(graphdef, params, tokens, valid, roles, adv)
    for got, want in ((per_group, want_g), (batch, want_b)):
        for k in ("full_norm", "norm", "cosine", "contribution", "num_tokens", "norm_per_token"):
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert float(batch.linearity_error) < 1e-5
    with pytest.raises(ValueError, match="multiple of group_size"):
        analysis.grouped_role_gradient_stats(
            graphdef, params, tokens, valid, roles, adv, group_size=3
        )


def test_role_without_tokens_has_zero_gradient(tiny_policy):
    cfg, graphdef, params = tiny_policy
    tokens, valid, roles, adv = _grad_batch(cfg.vocab_size, no_action=True)
    g = analysis.role_gradients(graphdef, params, tokens, valid, roles, adv)
    assert _tree_norm(g["action"]) == 0.0
    st = analysis.role_gradient_stats(graphdef, params, tokens, valid, roles, adv)
    assert float(st.norm[1]) == 0 and float(st.norm_per_token[1]) == 0
    assert float(st.cosine[1]) == 0 and float(st.num_tokens[1]) == 0
    np.testing.assert_allclose(float(st.cosine[0]), 1.0, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(st.contribution)))


def test_bad_arguments():
    data = synthetic(6, n_groups=2, group_size=2)
    with pytest.raises(ValueError):
        analysis.bottleneck_stats(data, 2, variant="median")
    with pytest.raises(ValueError):
        analysis.bottleneck_stats(data, 2, energy="bogus")
    with pytest.raises(ValueError):
        bn.bootstrap_ci(np.ones(3), alpha=1.5)


def test_advantage_by_turn_matches_numpy_and_shows_the_late_turn_imbalance():
    """Per turn and role: token share and mean advantage under the episode-level and per-turn GRPO
    baselines, against float64 loops (tests/np_reference.py); a success that ends in turn 0 leaves
    only failures in turns 1-2, whose tokens get a negative mean advantage under the episode
    baseline and zero under the per-turn one."""
    import np_reference as ref

    from actfocus_jax.analysis import advantage_by_turn

    g = 4
    # Group 0: rollout 0 solves in turn 0; rollouts 1-3 fail after 3 turns (one reasoning token
    # and one action token per turn, after one observation token). Group 1: random lengths.
    rng = np.random.default_rng(3)
    turn_ids = np.full((2 * g, 12), -1, np.int32)
    roles = np.zeros((2 * g, 12), np.int8)
    for i in range(2 * g):
        n_turns = 1 if i == 0 else (3 if i < g else int(rng.integers(1, 4)))
        for t in range(n_turns):
            turn_ids[i, 3 * t : 3 * t + 3] = t
            roles[i, 3 * t + 1] = int(Role.REASONING)
            roles[i, 3 * t + 2] = int(Role.ACTION)
    mask = roles > 0
    rewards = np.array([10, 0, 0, 0, *rng.integers(0, 2, size=g) * 10], np.float32)
    arrays = dict(
        episode_return=rewards,
        turn_ids=turn_ids,
        roles=roles,
        generated=mask,
        turn_rewards=np.zeros((2 * g, 3), np.float32),
    )
    out = advantage_by_turn(arrays, g)
    ep = ref.grpo_advantages(rewards, g)[:, None] * mask
    tb = ref.grpo_turn_advantages(rewards, turn_ids, mask, g)
    for name, adv in (("episode", ep), ("turn", tb)):
        np.testing.assert_allclose(out[name]["all"], adv[mask].mean(), rtol=1e-5, atol=1e-6)
        for t in range(3):
            for role, code in (("reasoning", Role.REASONING), ("action", Role.ACTION)):
                sel = mask & (turn_ids == t) & (roles == code)
                cell = out[name]["turns"][t][role]
                assert cell["share"] == pytest.approx(sel.sum() / mask.sum())
                np.testing.assert_allclose(cell["mean"], adv[sel].mean(), rtol=1e-5, atol=1e-6)
    # Group 0 alone: the late-turn tokens come from failures only.
    arrays0 = {k: v[:g] for k, v in arrays.items()}
    out0 = advantage_by_turn(arrays0, g)
    assert out0["episode"]["turns"][1]["action"]["mean"] == pytest.approx(-0.5, rel=1e-5)
    assert out0["turn"]["turns"][1]["action"]["mean"] == 0.0
    assert out0["episode"]["turns"][0]["action"]["mean"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="turn_ids"):
        advantage_by_turn({k: v for k, v in arrays.items() if k != "turn_ids"}, g)


def test_gradient_report_refuses_role_gradients_that_do_not_add_up(tiny_policy, monkeypatch):
    """``gradient_report`` checks the linearity self-check of every group and of the batch: role
    gradients that do not sum to the full gradient (a numerical or compiler fault) raise instead
    of being reported."""
    from actfocus_jax.analysis import gradients as G
    from actfocus_jax.analysis import policy_report as pr

    cfg, graphdef, params = tiny_policy
    tokens, _, roles, _ = _grad_batch(cfg.vocab_size)
    buf = {"tokens": tokens, "roles": roles, "episode_return": np.array([1.0, 0.0, 0.0, 1.0])}
    ok = pr.gradient_report(graphdef, params, buf, 2, num_resamples=50)
    assert ok["max_group_linearity_error"] < 1e-5 and ok["groups"]["n_groups"] == 2
    real = G.grouped_role_gradient_stats

    def broken(*args, **kwargs):
        per_group, batch = real(*args, **kwargs)
        return per_group.replace(linearity_error=per_group.linearity_error + 0.5), batch

    monkeypatch.setattr(G, "grouped_role_gradient_stats", broken)
    with pytest.raises(FloatingPointError, match="do not add up"):
        pr.gradient_report(graphdef, params, buf, 2, num_resamples=50)
