"""FrozenLake: JAX env vs an independent plain-Python reference (gym FrozenLake-v1 rules).

The reference below is written from gym's rules (``toy_text/frozen_lake.py``: action order Left,
Down, Right, Up; border moves stay; holes and goal terminal; slippery = uniform over
``[(a - 1) % 4, a, (a + 1) % 4]``) and the project's turn semantics (DESIGN.md section 6), not from
the env's code. For slippery mode it consumes the same random draws as the env by following the
documented key protocol (one ``split`` per executed action, ``randint(sub, (), 0, 3)``).
"""

from __future__ import annotations

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax.envs import make
from actfocus_jax.envs.base import ParsedActions, stack_tasks, unknown_tokens
from actfocus_jax.envs.frozenlake import FrozenLakeEnv, parse_map, slip_action

MOVES = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}  # gym: Left, Down, Right, Up


class RefLake:
    """Plain-Python FrozenLake episode (reference)."""

    def __init__(self, task, key, *, slippery, max_turns=5, max_k=3, cap=10, penalty=-0.1):
        self.holes = np.asarray(task.holes).astype(bool).tolist()
        self.n = len(self.holes)
        self.pos = (int(task.start[0]), int(task.start[1]))
        self.goal = (int(task.goal[0]), int(task.goal[1]))
        self.key = key
        self.slippery = slippery
        self.max_turns, self.max_k, self.cap, self.penalty = max_turns, max_k, cap, penalty
        self.turn = self.num_actions = 0
        self.success = self.pos == self.goal
        self.done = self.success or self.holes[self.pos[0]][self.pos[1]]

    def _executed(self, a):
        if not self.slippery:
            return a
        self.key, sub = jax.random.split(self.key)
        u = int(jax.random.randint(sub, (), 0, 3))
        return [(a - 1) % 4, a, (a + 1) % 4][u]

    def step(self, actions, format_ok, num_invalid):
        """Returns (reward, invalid_action)."""
        if self.done:
            return 0.0, 0
        self.turn += 1
        if not format_ok or num_invalid > 0 or not actions:
            reward, invalid = self.penalty, max(num_invalid, 1)
        else:
            reward, invalid = 0.0, 0
            for a in actions:
                if self.done or self.num_actions >= self.cap:
                    break
                dr, dc = MOVES[self._executed(a)]
                r, c = self.pos[0] + dr, self.pos[1] + dc
                if 0 <= r < self.n and 0 <= c < self.n:
                    self.pos = (r, c)
                self.num_actions += 1
                if self.pos == self.goal:
                    reward += 1.0
                    self.done = self.success = True
                elif self.holes[self.pos[0]][self.pos[1]]:
                    self.done = True
                if self.num_actions >= self.cap:
                    self.done = True
        if self.turn >= self.max_turns:
            self.done = True
        return reward, invalid

    def text(self):
        rows = []
        for r in range(self.n):
            cells = []
            for c in range(self.n):
                hole, goal, me = self.holes[r][c], (r, c) == self.goal, (r, c) == self.pos
                if me:
                    cells.append("X" if hole else "√" if goal else "P")
                else:
                    cells.append("O" if hole else "G" if goal else "_")
            rows.append(" ".join(cells))
        return "State:\n" + "\n".join(rows)


def reachable(holes, start, goal):
    """Independent solvability check: iterative flood fill (DFS)."""
    holes = np.asarray(holes).astype(bool)
    n = holes.shape[0]
    seen, stack = set(), [tuple(int(x) for x in start)]
    while stack:
        r, c = stack.pop()
        if (r, c) in seen or not (0 <= r < n and 0 <= c < n) or holes[r, c]:
            continue
        seen.add((r, c))
        stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return tuple(int(x) for x in goal) in seen


def distance(holes, start, goal):
    """Independent shortest distance (BFS on coordinates, 4-neighbourhood)."""
    holes = np.asarray(holes).astype(bool)
    n = holes.shape[0]
    s, g = tuple(int(x) for x in start), tuple(int(x) for x in goal)
    dist, q = {s: 0}, deque([s])
    while q:
        r, c = q.popleft()
        for dr, dc in MOVES.values():
            nxt = (r + dr, c + dc)
            if 0 <= nxt[0] < n and 0 <= nxt[1] < n and not holes[nxt] and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                q.append(nxt)
    return dist.get(g)


@pytest.fixture(scope="module")
def env():
    return make("frozenlake")


@pytest.fixture(scope="module")
def det_env():
    return make("frozenlake", slippery=False)


def random_turns(rng, n_turns, batch, k):
    """Random parsed answers [T, B]: mostly valid, some with format errors or invalid segments."""
    acts = np.full((n_turns, batch, k), -1, np.int32)
    num = np.zeros((n_turns, batch), np.int32)
    fmt = np.ones((n_turns, batch), bool)
    inv = np.zeros((n_turns, batch), np.int32)
    for t in range(n_turns):
        for b in range(batch):
            u = rng.random()
            m = int(rng.integers(1, k + 1))
            acts[t, b, :m] = rng.integers(0, 4, m)
            num[t, b] = m
            if u < 0.1:
                fmt[t, b] = False
            elif u < 0.2:
                inv[t, b] = int(rng.integers(1, 3))
    return acts, num, fmt, inv


def run_compare(env, slippery, batch, seed):
    rng = np.random.default_rng(seed)
    tasks = [env.generate_task(rng) for _ in range(batch)]
    keys = jax.random.split(jax.random.PRNGKey(seed), batch)
    turns = env.max_turns + 1  # one extra turn: steps on done episodes are no-ops
    acts, num, fmt, inv = random_turns(rng, turns, batch, env.max_actions_per_turn)
    reset = jax.jit(jax.vmap(env.reset))
    step = jax.jit(jax.vmap(env.step))
    state, ts = reset(keys, stack_tasks(tasks))
    refs = [RefLake(t, keys[i], slippery=slippery) for i, t in enumerate(tasks)]
    tok = env.tokenizer
    for t in range(turns):
        parsed = ParsedActions(
            actions=jnp.asarray(acts[t]),
            num=jnp.asarray(num[t]),
            format_ok=jnp.asarray(fmt[t]),
            num_invalid=jnp.asarray(inv[t]),
        )
        state, ts = step(state, parsed)
        ts = jax.device_get(ts)
        for b, ref in enumerate(refs):
            reward, invalid = ref.step(acts[t, b, : num[t, b]].tolist(), fmt[t, b], inv[t, b])
            assert ts.reward[b] == pytest.approx(reward), (t, b)
            assert ts.invalid_action[b] == invalid, (t, b)
            assert bool(ts.done[b]) == ref.done, (t, b)
            assert bool(ts.success[b]) == ref.success, (t, b)
            assert ts.num_actions[b] == ref.num_actions
            assert ts.turn[b] == ref.turn
            obs = ts.obs_tokens[b, : ts.obs_len[b]].tolist()
            assert obs == tok.encode(ref.text()), (t, b)
    return refs


def test_deterministic_matches_reference(det_env):
    refs = run_compare(det_env, slippery=False, batch=48, seed=1)
    assert any(r.success for r in refs) and any(r.done and not r.success for r in refs)


def test_slippery_matches_reference(env):
    refs = run_compare(env, slippery=True, batch=32, seed=2)
    assert any(r.done for r in refs)


def test_slip_distribution():
    """Each executed direction ~1/3 (intended and both perpendicular ones), never the opposite."""
    keys = jax.random.split(jax.random.PRNGKey(0), 30_000)
    draw = jax.jit(jax.vmap(slip_action, in_axes=(0, None)))
    for a in range(4):
        _, ex = draw(keys, jnp.int32(a))
        counts = np.bincount(np.asarray(ex), minlength=4) / len(keys)
        assert counts[(a + 2) % 4] == 0
        for b in ((a - 1) % 4, a, (a + 1) % 4):
            assert abs(counts[b] - 1 / 3) < 0.015, (a, counts)
    _, ex = jax.vmap(lambda k: slip_action(k, jnp.int32(2), slippery=False))(keys[:10])
    assert np.all(np.asarray(ex) == 2)


def test_slippery_env_transition_distribution():
    """Through reset/step: 'Up' from the middle of an open lake lands Up / Left / Right ~1/3 each."""
    task = parse_map("_ _ _ _ _\n_ _ _ _ _\n_ _ P _ _\n_ _ _ _ _\n_ _ _ _ G")
    lake = FrozenLakeEnv(size=5)
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    parsed = ParsedActions.from_list([3], 3)  # Up

    @jax.jit
    def one_step(keys):
        state, _ = jax.vmap(lake.reset, in_axes=(0, None))(keys, task)
        state, _ = jax.vmap(lake.step, in_axes=(0, None))(state, parsed)
        return state.player

    pos = [tuple(p) for p in np.asarray(one_step(keys)).tolist()]
    for target in ((1, 2), (2, 1), (2, 3)):  # Up, Left, Right
        assert abs(pos.count(target) / n - 1 / 3) < 0.03
    assert set(pos) == {(1, 2), (2, 1), (2, 3)}


def test_gym_map_holes_and_borders(det_env):
    task = parse_map("SFFF\nFHFH\nFFFH\nHFFG")
    assert det_env.solve(task) is not None and len(det_env.solve(task)) == 6
    step = jax.jit(det_env.step)
    state, ts = det_env.reset(jax.random.PRNGKey(0), task)
    assert det_env.render_text(state) == "State:\nP _ _ _\n_ O _ O\n_ _ _ O\nO _ _ G"
    state, ts = step(state, ParsedActions.from_list([0, 3], 3))  # border: stay
    assert state.player.tolist() == [0, 0] and not ts.done and ts.num_actions == 2
    state, ts = step(state, ParsedActions.from_list([1, 2, 2], 3))  # Down, Right -> hole
    assert ts.done and not ts.success and ts.reward == 0.0 and ts.num_actions == 4
    assert det_env.render_text(state) == "State:\n_ _ _ _\n_ X _ O\n_ _ _ O\nO _ _ G"
    state2, ts2 = step(state, ParsedActions.from_list([2], 3))  # absorbing
    assert ts2.reward == 0.0 and ts2.turn == ts.turn and state2.player.tolist() == [1, 1]


def test_generated_maps_solvable_and_solver_replays(det_env):
    rng = np.random.default_rng(4)
    tasks = [det_env.generate_task(rng) for _ in range(64)]
    holes = np.stack([t.holes for t in tasks])
    assert 0.05 < holes.mean() < 0.25  # p_frozen = 0.8, start/goal forced frozen, redraws
    starts = {tuple(t.start.tolist()) for t in tasks}
    assert len(starts) > 4  # RAGEN-style random starts
    for t in tasks:
        assert reachable(t.holes, t.start, t.goal)
        assert not t.holes[tuple(t.start)] and not t.holes[tuple(t.goal)]
        assert tuple(t.start) != tuple(t.goal)
        sol = det_env.solve(t)
        assert len(sol) == distance(t.holes, t.start, t.goal) == int(t.optimal_len)
        assert 1 <= len(sol) <= det_env.max_actions_per_episode
    reset, step = jax.jit(det_env.reset), jax.jit(det_env.step)
    k = det_env.max_actions_per_turn
    for t in tasks[:16]:
        state, ts = reset(jax.random.PRNGKey(0), t)
        sol, total = det_env.solve(t), 0.0
        for i in range(0, len(sol), k):
            state, ts = step(state, ParsedActions.from_list(sol[i : i + k], k))
            total += float(ts.reward)
        assert ts.success and ts.done and total == 1.0


def test_corner_start_goal_option():
    lake = FrozenLakeEnv(random_start_goal=False, size=5, max_actions_per_episode=12)
    t = lake.generate_task(np.random.default_rng(0))
    assert t.start.tolist() == [0, 0] and t.goal.tolist() == [4, 4] and t.holes.shape == (5, 5)
    assert reachable(t.holes, t.start, t.goal)


def test_vmap_1024_matches_unbatched(env):
    rng = np.random.default_rng(5)
    base = [env.generate_task(rng) for _ in range(16)]
    b = 1024
    tasks = stack_tasks([base[i % 16] for i in range(b)])
    keys = jax.random.split(jax.random.PRNGKey(6), b)
    acts, num, fmt, inv = random_turns(rng, 2, b, env.max_actions_per_turn)

    def episode(key, task, acts, num, fmt, inv):
        state, _ = env.reset(key, task)
        outs = []
        for t in range(2):
            parsed = ParsedActions(
                actions=acts[t], num=num[t], format_ok=fmt[t], num_invalid=inv[t]
            )
            state, ts = env.step(state, parsed)
            outs.append(ts)
        return state, outs

    args = (keys, tasks, *(np.swapaxes(x, 0, 1) for x in (acts, num, fmt, inv)))
    batched = jax.jit(jax.vmap(episode))(*args)
    looped = jax.jit(lambda *a: jax.lax.map(lambda x: episode(*x), a))(*args)
    jax.tree_util.tree_map(np.testing.assert_array_equal, batched, looped)
    single = jax.jit(episode)
    for i in (0, 17, 511, 1023):
        one = single(*(jax.tree_util.tree_map(lambda x, i=i: x[i], a) for a in args))
        ref = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        jax.tree_util.tree_map(np.testing.assert_array_equal, one, ref)


def test_typed_key_reset(env):
    task = env.generate_task(np.random.default_rng(7))
    s1, _ = env.reset(jax.random.key(3), task)
    s2, _ = env.reset(jax.random.PRNGKey(3), task)
    np.testing.assert_array_equal(s1.key, s2.key)


def test_invalid_answers_penalty_no_move(det_env):
    task = parse_map("_ _ _ _\n_ P _ _\n_ _ _ _\n_ _ _ G")
    state, _ = det_env.reset(jax.random.PRNGKey(0), task)
    step = jax.jit(det_env.step)
    for text in (
        "<think> go </think> Left",  # no answer span
        "<answer>Left || Jump</answer>",  # an invalid segment
        "<answer></answer>",  # empty answer
        "<answer>Left <answer>Up</answer>",  # duplicated tag
    ):
        parsed = det_env.parse_text(text)
        new, ts = step(state, parsed)
        assert float(ts.reward) == pytest.approx(-0.1), text
        assert ts.invalid_action >= 1 and ts.turn == state.turn + 1, text
        assert new.player.tolist() == [1, 1] and ts.num_actions == 0, text
    parsed = det_env.parse_text("<think> x </think><answer>right || Down</answer>")
    assert parsed.num == 2 and parsed.actions[:2].tolist() == [2, 1]
    new, ts = step(state, parsed)
    assert new.player.tolist() == [2, 2] and ts.invalid_action == 0 and ts.reward == 0.0


def test_limits(det_env):
    task = parse_map("P _ _ _\n_ _ _ _\n_ _ _ _\n_ _ _ G")
    state, _ = det_env.reset(jax.random.PRNGKey(0), task)
    step = jax.jit(det_env.step)
    for _ in range(4):  # 3 + 3 + 3 + 1 actions into the border: the 10-action cap ends it
        state, ts = step(state, ParsedActions.from_list([0, 3, 0], 3))
    assert ts.done and not ts.success and ts.num_actions == 10 and ts.turn == 4
    state, _ = det_env.reset(jax.random.PRNGKey(0), task)
    for _ in range(5):  # 5 turns of format errors: the turn cap ends it
        state, ts = step(state, det_env.parse_text("nothing"))
    assert ts.done and ts.turn == 5 and ts.num_actions == 0


def test_text_vocab_and_decode(env):
    tok = env.tokenizer
    assert unknown_tokens(tok, env.system_prompt()) == []
    assert unknown_tokens(tok, make("frozenlake", slippery=False).system_prompt()) == []
    rng = np.random.default_rng(8)
    for _ in range(8):
        task = env.generate_task(rng)
        state, ts = env.reset(jax.random.PRNGKey(0), task)
        text = env.render_text(state)
        assert text == env.render_text(task)
        ids = np.asarray(ts.obs_tokens)[: int(ts.obs_len)].tolist()
        assert tok.token_to_id("<unk>") not in ids
        assert "".join(tok.decode(ids).split()) == "".join(text.split())
        assert ids == tok.encode(text)
        assert np.all(np.asarray(ts.obs_tokens)[int(ts.obs_len) :] == tok.pad_id)
    assert ts.obs_tokens.shape == (env.max_obs_len,)
    assert env.action_names == ("Left", "Down", "Right", "Up")
    assert (env.max_turns, env.max_actions_per_turn, env.max_actions_per_episode) == (5, 3, 10)
