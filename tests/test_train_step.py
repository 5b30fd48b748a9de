"""The jitted RL update on real rollouts of the tiny transformer in Sokoban.

Checks: buffer log-probs equal re-scoring (first-minibatch ratio is 1), loss finite and parameters
change for GRPO / PPO with and without ActFocus, ``alpha=1, beta=0`` reproduces the plain update bit
for bit, and metrics are chex-checked.
"""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actfocus_jax import envs
from actfocus_jax.models import get_config, value_model_from_policy
from actfocus_jax.models.transformer import init_model
from actfocus_jax.rl.actfocus import ActFocusConfig
from actfocus_jax.rl.train_step import (
    AlgoConfig,
    TrainStatics,
    batch_from_buffer,
    init_train_state,
    make_optimizer,
    train_step,
)
from actfocus_jax.rollout.buffer import check_buffer
from actfocus_jax.rollout.engine import (
    RolloutConfig,
    make_turn_template,
    rollout_fused,
    transformer_policy,
)
from actfocus_jax.rollout.roles import Role

GROUP = 4


@pytest.fixture(scope="module")
def rollout():
    env = envs.make("sokoban", max_turns=2)
    tok = env.tokenizer
    config = get_config("tiny", n_layers=2, vocab_size=max(320, -(-tok.vocab_size // 64) * 64))
    model = init_model(config, 0)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(1)
    tasks = jax.tree.map(lambda *x: np.stack(x), *[env.generate_task(rng) for _ in range(2)])
    cfg = RolloutConfig(max_turns=2, max_response_tokens=10, temperature=1.0)
    buf = rollout_fused(
        params,
        tasks,
        np.arange(2, dtype=np.int32),
        jax.random.key(0),
        policy=transformer_policy(graphdef, config),
        env=env,
        template=make_turn_template(tok, env.system_prompt(), "plain"),
        cfg=cfg,
        group_size=GROUP,
        vocab=config.vocab_size,
    )
    check_buffer(buf)
    # Give the rewards some spread so GRPO advantages are non-zero.
    buf = buf.replace(
        turn_rewards=buf.turn_rewards
        + jnp.where(buf.reward_pos >= 0, jnp.arange(8.0)[:, None], 0.0)
    )
    buf = buf.replace(episode_return=buf.turn_rewards.sum(1))
    return model, batch_from_buffer(buf)


def _update(model, batch, algo_cfg, seed=0):
    graphdef, _ = nnx.split(model)
    critic = value_model_from_policy(model) if algo_cfg.algo == "ppo" else None
    statics = TrainStatics(
        policy_graphdef=graphdef,
        critic_graphdef=nnx.split(critic)[0] if critic is not None else None,
        optimizer=make_optimizer(1e-3),
        critic_optimizer=make_optimizer(1e-3) if critic is not None else None,
        config=algo_cfg,
    )
    state = init_train_state(model, statics, critic)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = train_step(state, batch, jax.random.key(seed), statics=statics)
    return before, state, metrics


@pytest.mark.parametrize(
    "algo,actfocus",
    [("grpo", True), ("grpo", False), ("ppo", True), ("ppo", False)],
)
def test_update_is_finite_and_moves_parameters(rollout, algo, actfocus):
    model, batch = rollout
    cfg = AlgoConfig(
        algo=algo,
        group_size=GROUP,
        epochs=2,
        num_minibatches=2,
        kl_coef=0.01 if algo == "grpo" else 0.0,
        actfocus=ActFocusConfig(enabled=actfocus),
    )
    before, state, metrics = _update(model, batch, cfg)
    chex.assert_tree_all_finite(metrics)
    chex.assert_shape(metrics.tokens.weights, batch.tokens.shape)
    assert float(metrics.first_ratio_dev) < 1e-5, "buffer log-probs differ from re-scoring"
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
    assert all(jax.tree.leaves(changed))
    if actfocus:
        w = np.asarray(metrics.tokens.weights)
        roles = np.asarray(batch.roles)
        np.testing.assert_allclose(w[roles == 1], 0.1)
    if algo == "ppo":
        assert float(metrics.critic_grad_norm) > 0


def test_alpha1_beta0_equals_plain_update_bitwise(rollout):
    model, batch = rollout
    base = AlgoConfig(group_size=GROUP, num_minibatches=2, actfocus=ActFocusConfig(enabled=False))
    neutral = dataclasses.replace(
        base, actfocus=ActFocusConfig(alpha=1.0, beta=0.0, w_max=5.0, enabled=True)
    )
    _, s1, m1 = _update(model, batch, base)
    _, s2, m2 = _update(model, batch, neutral)
    chex.assert_trees_all_equal(s1.params, s2.params)
    assert float(m1.loss) == float(m2.loss)


def test_shuffled_advantages_control_permutes_episode_advantages(rollout):
    """The drift control: the same per-episode advantages (NumPy GRPO reference), each moved to
    another episode; the default path's key stream is untouched by the option's existence."""
    model, batch = rollout
    base = AlgoConfig(group_size=GROUP, actfocus=ActFocusConfig(enabled=False))
    _, _, m_real = _update(model, batch, base)
    _, _, m_shuf = _update(model, batch, dataclasses.replace(base, shuffle_advantages=True))
    mask = np.asarray(batch.loss_mask)
    ret = np.asarray(batch.episode_return, np.float64).reshape(-1, GROUP)
    sd = ret.std(1, ddof=1, keepdims=True)  # GRPO: the unbiased group std
    ref = ((ret - ret.mean(1, keepdims=True)) / (sd + 1e-6)).reshape(-1)

    def per_episode(m):
        adv = np.asarray(m.tokens.advantages)
        # Every generated token of an episode carries the episode's advantage.
        first = np.argmax(mask, axis=1)
        ep = adv[np.arange(len(adv)), first]
        np.testing.assert_allclose(np.where(mask, adv, 0.0), np.where(mask, ep[:, None], 0.0))
        return ep

    real, shuf = per_episode(m_real), per_episode(m_shuf)
    np.testing.assert_allclose(real, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.sort(shuf), np.sort(ref), rtol=1e-4, atol=1e-5)
    assert not np.allclose(shuf, ref), "advantages were not moved between episodes"
    with pytest.raises(ValueError, match="shuffle_advantages"):
        AlgoConfig(algo="ppo", shuffle_advantages=True)


def test_turn_baseline_update_uses_per_turn_advantages(rollout):
    import np_reference as ref

    model, batch = rollout
    cfg = AlgoConfig(group_size=GROUP, turn_baseline=True, actfocus=ActFocusConfig(enabled=True))
    before, state, m = _update(model, batch, cfg)
    chex.assert_tree_all_finite(m)
    expected = ref.grpo_turn_advantages(
        batch.episode_return, batch.turn_ids, batch.loss_mask, GROUP
    )
    np.testing.assert_allclose(m.tokens.advantages, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(before)[0])
    with pytest.raises(ValueError, match="turn_baseline"):
        AlgoConfig(algo="ppo", turn_baseline=True)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="algo"):
        AlgoConfig(algo="a2c")
    with pytest.raises(ValueError, match="group_size"):
        AlgoConfig(group_size=1)
    with pytest.raises(ValueError, match="kl_in_reward"):
        AlgoConfig(kl_in_reward=True)


def test_non_finite_minibatch_is_rejected_and_state_kept(rollout):
    model, batch = rollout
    bad = batch.replace(old_logp=jnp.where(batch.loss_mask, jnp.nan, batch.old_logp))
    cfg = AlgoConfig(group_size=GROUP, num_minibatches=2, actfocus=ActFocusConfig(enabled=False))
    before, state, metrics = _update(model, bad, cfg)
    assert int(metrics.num_rejected) == 2
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), before)


def test_make_optimizer_kinds_match_their_update_rules():
    """SGD (momentum b1) and AdamW (eps) after global-norm clipping, against hand-written float64
    updates of two steps."""
    from actfocus_jax.rl.train_step import make_optimizer

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(3, 4)) * s, jnp.float32)} for s in (3.0, 0.1)]

    def clipped(g, max_norm=1.0):
        g = np.asarray(g["w"], np.float64)
        return g * min(1.0, max_norm / np.linalg.norm(g))

    def run(opt):
        state, p, out = opt.init(params), params, []
        for g in grads:
            upd, state = opt.update(g, state, p)
            p = jax.tree.map(lambda a, b: a + b, p, upd)
            out.append(np.asarray(upd["w"], np.float64))
        return out

    lr, mom = 0.1, 0.5
    got = run(make_optimizer(lr, kind="sgd", b1=mom))
    m1 = clipped(grads[0])
    m2 = mom * m1 + clipped(grads[1])
    np.testing.assert_allclose(got[0], -lr * m1, rtol=1e-5)
    np.testing.assert_allclose(got[1], -lr * m2, rtol=1e-5)

    eps, b1, b2 = 0.5, 0.9, 0.999
    got = run(make_optimizer(lr, eps=eps, b1=b1, b2=b2))
    m = v = 0.0
    for t, g in enumerate(grads, 1):
        g = clipped(g)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(got[t - 1], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer(lr, kind="lion")


def test_critic_warmup_freezes_the_policy_until_its_step(rollout):
    """PPO with ``critic_warmup_steps=2``: steps 0 and 1 change the critic only (policy and its
    Adam state bit for bit), step 2 updates both, exactly as an update without warm-up would from
    the same state; GRPO refuses the option (it has no critic)."""
    model, batch = rollout
    cfg = AlgoConfig(algo="ppo", group_size=GROUP, critic_warmup_steps=2)
    graphdef, _ = nnx.split(model)
    critic = value_model_from_policy(model)

    def statics_of(c):
        return TrainStatics(
            policy_graphdef=graphdef,
            critic_graphdef=nnx.split(critic)[0],
            optimizer=make_optimizer(1e-3),
            critic_optimizer=make_optimizer(1e-3),
            config=c,
        )

    statics = statics_of(cfg)
    state = init_train_state(model, statics, critic)
    p0 = jax.tree.map(np.asarray, (state.params, state.opt_state))
    critics = [jax.tree.map(np.asarray, state.critic_params)]
    step = jax.jit(train_step, static_argnames="statics")
    for k in range(2):
        state, m = step(state, batch, jax.random.key(k), statics=statics)
        chex.assert_trees_all_equal((state.params, state.opt_state), p0)
        critics.append(jax.tree.map(np.asarray, state.critic_params))
        assert float(m.critic_grad_norm) > 0
        # No policy backward pass in warm-up (grad_norm 0), but its loss is still computed.
        assert float(m.grad_norm) == 0 and np.isfinite(float(m.pg_loss)) and float(m.loss) != 0
    for before, after in itertools.pairwise(critics):  # the critic learns in both warm-up steps
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
        assert any(jax.tree.leaves(moved))
    assert int(state.step) == 2
    # Step 2: the policy moves, as the same update without warm-up moves it from this state.
    plain = statics_of(dataclasses.replace(cfg, critic_warmup_steps=0))
    s_warm, _ = step(state, batch, jax.random.key(2), statics=statics)
    s_plain, _ = step(state, batch, jax.random.key(2), statics=plain)
    chex.assert_trees_all_equal(s_warm.params, s_plain.params)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), s_warm.params, p0[0])
    assert all(jax.tree.leaves(changed))
    with pytest.raises(ValueError, match="GRPO has no critic"):
        AlgoConfig(algo="grpo", critic_warmup_steps=1)
    with pytest.raises(ValueError, match=">= 0"):
        AlgoConfig(algo="ppo", critic_warmup_steps=-1)


def test_whitened_ppo_advantages_match_the_float64_reference(rollout):
    """``whiten_advantages``: the update's advantages are the raw GAE advantages of the same
    critic whitened over the batch's loss tokens (NumPy float64 reference), the critic's targets
    (returns) unchanged; GRPO refuses the option."""
    import np_reference as ref

    model, batch = rollout
    raw = AlgoConfig(algo="ppo", group_size=GROUP)
    _, _, m_raw = _update(model, batch, raw)
    _, _, m_white = _update(model, batch, dataclasses.replace(raw, whiten_advantages=True))
    mask = np.asarray(batch.loss_mask)
    a_raw = np.asarray(m_raw.tokens.advantages, np.float64)
    assert abs(a_raw[mask].mean()) > 0.1  # the fresh critic leaves the raw advantages uncentred
    want = ref.masked_whiten(a_raw, mask)
    np.testing.assert_allclose(np.asarray(m_white.tokens.advantages), want, atol=2e-5)
    np.testing.assert_allclose(float(m_white.adv_mean), 0.0, atol=1e-5)
    np.testing.assert_allclose(float(m_white.adv_std), np.std(want[mask]), rtol=1e-4)
    chex.assert_trees_all_equal(m_white.tokens.returns, m_raw.tokens.returns)
    with pytest.raises(ValueError, match="already normalised per group"):
        AlgoConfig(algo="grpo", whiten_advantages=True)


def test_group_centred_ppo_advantages_match_the_float64_reference(rollout):
    """``group_center_advantages``: the update's advantages are the raw GAE advantages of the
    same critic, each task group's token mean subtracted (NumPy float64 reference), so every
    group is centred whatever the critic predicts; the critic's targets are unchanged; GRPO and
    the combination with whitening are refused."""
    import np_reference as ref

    model, batch = rollout
    raw = AlgoConfig(algo="ppo", group_size=GROUP)
    _, _, m_raw = _update(model, batch, raw)
    cfg = dataclasses.replace(raw, group_center_advantages=True)
    _, _, m_gc = _update(model, batch, cfg)
    mask = np.asarray(batch.loss_mask)
    a_raw = np.asarray(m_raw.tokens.advantages, np.float64)
    want = ref.masked_group_center(a_raw, mask, GROUP)
    assert np.abs(want - np.where(mask, a_raw, 0)).max() > 0.1  # the groups were not centred
    got = np.asarray(m_gc.tokens.advantages)
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g in range(mask.shape[0] // GROUP):
        rows = slice(g * GROUP, (g + 1) * GROUP)
        np.testing.assert_allclose(got[rows][mask[rows]].mean(), 0.0, atol=1e-5)
    chex.assert_trees_all_equal(m_gc.tokens.returns, m_raw.tokens.returns)
    with pytest.raises(ValueError, match="already centred per group"):
        AlgoConfig(algo="grpo", group_center_advantages=True)
    with pytest.raises(ValueError, match="without whiten_advantages"):
        AlgoConfig(algo="ppo", group_center_advantages=True, whiten_advantages=True)


def test_advantage_by_role_and_weighted_mean_match_the_float64_reference(rollout):
    """``reasoning_adv_mean`` / ``action_adv_mean`` are the mean advantage over the loss tokens of
    each role and ``weighted_adv_mean`` is ``sum(w A) / sum(w)`` over the loss tokens (NumPy
    float64 from the step's own per-token advantages and weights). Without ActFocus it equals the
    plain mean (0 under group-centred PPO). The roles of the generated tokens are then re-drawn so
    that the tokens with positive centred advantage are the actions: the advantages do not change,
    their plain mean stays 0, and ActFocus's weights (alpha = 0.1 on reasoning) move the mean the
    loss sees above 0."""
    model, batch = rollout
    roles = np.asarray(batch.roles)
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    mask = np.asarray(batch.loss_mask, bool)
    base = AlgoConfig(algo="ppo", group_size=GROUP, group_center_advantages=True)
    first = None
    for enabled in (False, True):
        cfg = dataclasses.replace(base, actfocus=ActFocusConfig(enabled=enabled, alpha=0.1))
        _, _, m = _update(model, batch, cfg)
        a = np.asarray(m.tokens.advantages, np.float64)
        w = np.where(mask, np.asarray(m.tokens.weights, np.float64), 0.0)
        r = np.asarray(batch.roles)
        is_a, is_r = mask & (r == Role.ACTION), mask & (r == Role.REASONING)
        for got, sel in ((m.reasoning_adv_mean, is_r), (m.action_adv_mean, is_a)):
            np.testing.assert_allclose(float(got), a[sel].mean() if sel.any() else 0.0, atol=1e-5)
        want = (w * a).sum() / w.sum()
        np.testing.assert_allclose(float(m.weighted_adv_mean), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(m.adv_mean), 0.0, atol=1e-5)  # centred per group
        if not enabled:
            np.testing.assert_allclose(float(m.weighted_adv_mean), float(m.adv_mean), atol=1e-6)
            first = a
            positive = gen & (a > 0)
            assert positive[mask].mean() > 0.1 and (~positive)[mask].mean() > 0.1
            new_roles = np.where(gen, np.where(positive, Role.ACTION, Role.REASONING), roles)
            batch = batch.replace(roles=jnp.asarray(new_roles.astype(roles.dtype)))
        else:
            np.testing.assert_allclose(a, first, atol=1e-6)  # roles do not enter the advantages
            assert float(m.reasoning_adv_mean) < 0 < float(m.action_adv_mean)
            assert np.all(w[is_r] == np.float32(0.1)) and w[is_a].mean() > 0.5
            assert want > 0.5 * float(m.action_adv_mean)


def test_critic_diagnostics_match_the_float64_reference(rollout):
    """``value_mean`` / ``return_mean`` / ``value_explained_var`` are the masked mean of the
    rollout-time values and GAE returns and ``1 - Var(R - V) / Var(R)`` over the loss tokens
    (NumPy float64 from the step's own per-token intermediates): 0 / mean R / 0 for a fresh
    zero-head critic, the same formulas once the critic has learned a step; GRPO reports 0."""
    model, batch = rollout
    cfg = AlgoConfig(algo="ppo", group_size=GROUP)
    graphdef, _ = nnx.split(model)
    critic = value_model_from_policy(model)
    statics = TrainStatics(
        policy_graphdef=graphdef,
        critic_graphdef=nnx.split(critic)[0],
        optimizer=make_optimizer(1e-3),
        critic_optimizer=make_optimizer(1e-2),
        config=cfg,
    )
    state = init_train_state(model, statics, critic)
    step = jax.jit(train_step, static_argnames="statics")
    mask = np.asarray(batch.loss_mask, bool)
    for k in range(2):
        state, m = step(state, batch, jax.random.key(k), statics=statics)
        v = np.asarray(m.tokens.values, np.float64)[mask]
        r = np.asarray(m.tokens.returns, np.float64)[mask]
        ev = 1.0 - np.var(r - v) / np.var(r)
        np.testing.assert_allclose(float(m.value_mean), v.mean(), atol=1e-5)
        np.testing.assert_allclose(float(m.return_mean), r.mean(), atol=1e-5)
        np.testing.assert_allclose(float(m.value_explained_var), ev, atol=1e-5)
        # The advantages are R - V (gamma = lam = 1): their mean is the gap of the two means.
        np.testing.assert_allclose(float(m.adv_mean), r.mean() - v.mean(), atol=1e-4)
        if k == 0:  # zero head: V = 0, nothing explained
            assert float(m.value_mean) == 0.0 and float(m.value_explained_var) == 0.0
            assert np.var(r) > 0
    assert float(m.value_mean) != 0.0  # the critic learned in step 0
    _, _, g = _update(model, batch, AlgoConfig(algo="grpo", group_size=GROUP))
    assert float(g.value_mean) == float(g.return_mean) == float(g.value_explained_var) == 0.0


def _widen(batch, extra):
    """``batch`` with ``extra`` padding columns appended (not valid, not in the loss)."""

    def pad(x):
        if x.ndim != 2:
            return x
        return jnp.concatenate([x, jnp.zeros((x.shape[0], extra), x.dtype)], axis=1)

    return jax.tree.map(pad, batch)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_trimmed_batch_gives_the_same_update(rollout, algo):
    from actfocus_jax.rl.train_step import trim_batch

    model, batch = rollout
    width = batch.tokens.shape[1]
    wide = _widen(batch, 300)
    valid = np.asarray(batch.valid)
    used = int(max(np.nonzero(row)[0].max() + 1 for row in valid))
    trimmed = trim_batch(wide, 32)
    new_width = trimmed.tokens.shape[1]
    assert new_width % 32 == 0 and used <= new_width < used + 32 and new_width <= width + 300
    assert trim_batch(wide, 0) is wide and trim_batch(trimmed, 32) is trimmed
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[:, :new_width] if x.ndim == 2 else x, wide), trimmed
    )
    cfg = AlgoConfig(
        algo=algo,
        group_size=GROUP,
        epochs=2,
        num_minibatches=2,
        kl_coef=0.01,
        actfocus=ActFocusConfig(),
    )
    _, s_wide, m_wide = _update(model, wide, cfg)
    _, s_trim, m_trim = _update(model, trimmed, cfg)
    # The same update up to float summation order over the dropped (all-zero) columns.
    # (Adam steps are ~lr = 1e-3 in size; a wrong update would differ by that much.)
    chex.assert_trees_all_close(s_trim.params, s_wide.params, atol=1e-5, rtol=1e-4)
    if algo == "ppo":
        chex.assert_trees_all_close(s_trim.critic_params, s_wide.critic_params, atol=1e-5)
    for name in ("loss", "pg_loss", "kl", "adv_mean", "adv_std", "grad_norm", "value_loss"):
        np.testing.assert_allclose(m_trim[name], m_wide[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        m_trim.tokens.weights, np.asarray(m_wide.tokens.weights)[:, :new_width], atol=1e-6
    )
