"""Sokoban env vs an independent plain-Python reference of gym-sokoban's rules (as used by RAGEN)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax.envs import make
from actfocus_jax.envs.base import ParsedActions, stack_tasks, unknown_tokens
from actfocus_jax.envs.sokoban import SokobanEnv, parse_level

MOVES = {"Up": (-1, 0), "Down": (1, 0), "Left": (0, -1), "Right": (0, 1)}
NAMES = ["Up", "Down", "Left", "Right"]


# --------------------------------------------------------------------------------------------
# Independent reference (dict/set based): gym-sokoban push/move rules and rewards
# --------------------------------------------------------------------------------------------


class RefSokoban:
    """One episode; cells as (row, col) tuples; RAGEN-like turn handling."""

    def __init__(self, task, cap=10, max_turns=5, penalty=-0.1):
        h, w = np.asarray(task.walls).shape
        self.walls = {(r, c) for r in range(h) for c in range(w) if task.walls[r][c]}
        self.targets = {(r, c) for r in range(h) for c in range(w) if task.targets[r][c]}
        self.boxes = {(r, c) for r in range(h) for c in range(w) if task.boxes[r][c]}
        self.player = (int(task.player[0]), int(task.player[1]))
        self.cap, self.max_turns, self.penalty = cap, max_turns, penalty
        self.n_actions, self.turns = 0, 0
        self.success = self.boxes <= self.targets
        self.done = self.success

    def move(self, name):
        dr, dc = MOVES[name]
        one = (self.player[0] + dr, self.player[1] + dc)
        two = (one[0] + dr, one[1] + dc)
        on_before = len(self.boxes & self.targets)
        if one in self.boxes:
            if two not in self.walls and two not in self.boxes:
                self.boxes = (self.boxes - {one}) | {two}
                self.player = one
        elif one not in self.walls:
            self.player = one
        on_after = len(self.boxes & self.targets)
        reward = -0.1
        if on_after > on_before:
            reward += 1.0
        elif on_after < on_before:
            reward -= 1.0
        won = on_after == len(self.boxes)
        if won:
            reward += 10.0
        return reward, won

    def turn(self, names, valid=True):
        """Returns (reward, invalid flag) of one turn."""
        if self.done:
            return 0.0, False
        self.turns += 1
        total = 0.0
        if not valid or not names:
            total = self.penalty
        else:
            for name in names:
                if self.done or self.n_actions >= self.cap:
                    break
                r, won = self.move(name)
                total += r
                self.n_actions += 1
                if won:
                    self.success = self.done = True
                if self.n_actions >= self.cap:
                    self.done = True
        if self.turns >= self.max_turns:
            self.done = True
        return total, not valid or not names

    def grid(self, shape):
        boxes = np.zeros(shape, np.int8)
        for b in self.boxes:
            boxes[b] = 1
        return boxes


def ref_bfs(task):
    """Independent BFS: minimal number of actions, states as (player, frozenset(boxes))."""
    ref = RefSokoban(task)
    start = (ref.player, frozenset(ref.boxes))
    dist = {start: 0}
    todo = collections.deque([start])
    while todo:
        player, boxes = todo.popleft()
        if boxes <= ref.targets:
            return dist[(player, boxes)]
        for dr, dc in MOVES.values():
            one = (player[0] + dr, player[1] + dc)
            if one in ref.walls:
                continue
            new_boxes = boxes
            if one in boxes:
                two = (one[0] + dr, one[1] + dc)
                if two in ref.walls or two in boxes:
                    continue
                new_boxes = (boxes - {one}) | {two}
            key = (one, new_boxes)
            if key not in dist:
                dist[key] = dist[(player, boxes)] + 1
                todo.append(key)
    return None


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

HAND_LEVELS = [
    # box next to target (push on / push off), wall bumps
    "# # # # # #\n# _ _ _ _ #\n# P X O _ #\n# _ _ _ _ #\n# _ _ _ _ #\n# # # # # #",
    # box in a corner (deadlock) and box into box
    "# # # # # #\n# X _ _ _ #\n# _ P X X #\n# _ _ _ O #\n# O _ _ O #\n# # # # # #",
    # player on target, box on target, two boxes
    "# # # # # #\n# S √ _ _ #\n# _ _ X _ #\n# _ # _ _ #\n# _ _ _ _ #\n# # # # # #",
]


@pytest.fixture(scope="module")
def env():
    return make("sokoban")


@pytest.fixture(scope="module")
def tasks(env):
    rng = np.random.default_rng(0)
    return [env.generate_task(rng) for _ in range(64)]


@pytest.fixture(scope="module")
def single(env):
    return jax.jit(env.reset), jax.jit(env.step)


@pytest.fixture(scope="module")
def jitted(env):
    return jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step))


def random_turns(rng, n_inst, n_turns, k):
    """Random parsed actions [n_turns][batch]: valid lists of 1..k actions or invalid turns."""
    turns = []
    for _ in range(n_turns):
        acts = np.full((n_inst, k), -1, np.int32)
        num = rng.integers(1, k + 1, size=n_inst).astype(np.int32)
        fmt = rng.random(n_inst) > 0.1
        inv = np.where(rng.random(n_inst) < 0.1, rng.integers(1, 3, size=n_inst), 0).astype(
            np.int32
        )
        for i in range(n_inst):
            acts[i, : num[i]] = rng.integers(0, 4, size=num[i])
        turns.append((acts, num, fmt, inv))
    return turns


def parsed_batch(acts, num, fmt, inv):
    return ParsedActions(
        actions=jnp.asarray(acts),
        num=jnp.asarray(num),
        format_ok=jnp.asarray(fmt),
        num_invalid=jnp.asarray(inv),
    )


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_rules_match_reference_on_random_play(env, tasks, jitted):
    reset, step = jitted
    levels = [parse_level(t) for t in HAND_LEVELS] * 8 + tasks
    batch = stack_tasks(levels)
    n = len(levels)
    rng = np.random.default_rng(1)
    state, ts = reset(jax.random.split(jax.random.key(0), n), batch)
    refs = [RefSokoban(t) for t in levels]
    seen = collections.Counter()
    for acts, num, fmt, inv in random_turns(rng, n, env.max_turns + 1, env.max_actions_per_turn):
        state, ts = step(state, parsed_batch(acts, num, fmt, inv))
        for i, ref in enumerate(refs):
            before = len(ref.boxes & ref.targets)
            was_done = ref.done
            valid = bool(fmt[i]) and inv[i] == 0
            reward, invalid = ref.turn([NAMES[a] for a in acts[i, : num[i]]], valid)
            if not was_done:
                seen["invalid" if invalid else "valid"] += 1
                seen["on" if len(ref.boxes & ref.targets) > before else "same"] += 1
            assert ts.reward[i] == pytest.approx(reward, abs=1e-5), (i, acts[i])
            assert bool(ts.done[i]) == ref.done
            assert bool(ts.success[i]) == ref.success
            assert (int(ts.invalid_action[i]) > 0) == (invalid and not was_done)
            assert int(ts.num_actions[i]) == ref.n_actions
            assert int(ts.turn[i]) == ref.turns
            assert tuple(np.asarray(state.player[i])) == ref.player
            np.testing.assert_array_equal(state.boxes[i], ref.grid(state.boxes[i].shape))
    assert seen["invalid"] > 10 and seen["on"] > 5 and any(r.success for r in refs)
    assert all(r.done for r in refs)


def test_exact_rewards_and_blocking(env, single):
    reset, step = single
    # push onto target (+1 - 0.1), then off it (-1 - 0.1), then wall bump
    s, _ = reset(None, parse_level(HAND_LEVELS[0]))
    s, ts = step(s, ParsedActions.from_list([3], 3))
    assert float(ts.reward) == pytest.approx(10.9)  # single box: solved (+10) too
    assert bool(ts.done) and bool(ts.success)
    two_boxes = parse_level(HAND_LEVELS[2])
    s, _ = reset(None, two_boxes)
    s, ts = step(s, ParsedActions.from_list([3], 3))  # push the box off its target
    assert float(ts.reward) == pytest.approx(-1.1)
    s, ts = step(s, ParsedActions.from_list([0], 3))  # wall: no move, step penalty
    assert float(ts.reward) == pytest.approx(-0.1)
    # box into box and box into corner: unchanged
    s0, _ = reset(None, parse_level(HAND_LEVELS[1]))
    s1, ts = step(s0, ParsedActions.from_list([3], 3))
    assert float(ts.reward) == pytest.approx(-0.1)
    np.testing.assert_array_equal(s1.boxes, s0.boxes)
    np.testing.assert_array_equal(s1.player, s0.player)
    # invalid output: format penalty, no move, flagged
    bad = ParsedActions(
        actions=jnp.array([3, -1, -1]), num=jnp.array(1), format_ok=jnp.array(True),
        num_invalid=jnp.array(1),
    )  # fmt: skip
    s2, ts = step(s0, bad)
    assert float(ts.reward) == pytest.approx(env.format_penalty)
    assert int(ts.invalid_action) == 1 and int(ts.num_actions) == 0 and int(ts.turn) == 1
    np.testing.assert_array_equal(s2.player, s0.player)
    # env.parse_text -> step: the text path
    s3, ts = step(s0, env.parse_text("<think>go</think><answer>Down || Left || Left</answer>"))
    assert int(ts.num_actions) == 3 and tuple(np.asarray(s3.player)) == (3, 1)
    assert float(ts.reward) == pytest.approx(-0.3)


def test_action_cap_and_absorbing(env, single):
    reset, step = single
    s, _ = reset(None, parse_level(HAND_LEVELS[1]))
    for _ in range(4):
        s, ts = step(s, ParsedActions.from_list([0, 1, 0], 3))  # bounce up/down
    assert int(ts.num_actions) == env.max_actions_per_episode and bool(ts.done)
    assert not bool(ts.success)
    s2, ts2 = step(s, ParsedActions.from_list([0], 3))
    assert float(ts2.reward) == 0.0 and int(ts2.turn) == int(ts.turn)
    np.testing.assert_array_equal(s2.player, s.player)


def test_solver_optimal_and_replays(env, tasks):
    big = SokobanEnv(room_size=(7, 7), num_boxes=2, max_actions_per_episode=20)
    rng = np.random.default_rng(3)
    levels = [(env, t) for t in tasks[:6]] + [(big, big.generate_task(rng)) for _ in range(3)]
    levels.append((env, parse_level(HAND_LEVELS[2])))
    replays = {}
    for e, task in levels:
        sol = e.solve(task)
        assert sol is not None and len(sol) == ref_bfs(task)
        if int(task.optimal_len) >= 0:
            assert len(sol) == int(task.optimal_len)
        if e.room_size not in replays:
            replay = SokobanEnv(
                room_size=e.room_size, num_boxes=e.num_boxes, max_turns=100,
                max_actions_per_turn=1, max_actions_per_episode=100,
            )  # fmt: skip
            replays[e.room_size] = (jax.jit(replay.reset), jax.jit(replay.step))
        reset, step = replays[e.room_size]
        ref = RefSokoban(task, cap=100, max_turns=100)
        s, ts = reset(None, task)
        for a in sol:
            assert not bool(ts.done)
            s, ts = step(s, ParsedActions.from_list([a], 1))
            ref.turn([NAMES[a]])
        assert bool(ts.success) and bool(ts.done) and ref.success
    # already solved / unsolvable
    assert env.solve(parse_level("# # # #\n# S √ #\n# # # #")) == []
    assert env.solve(parse_level("# # # # #\n# P _ X #\n# O # # #\n# # # # #")) is None


def test_generation_solvable_deterministic(env, tasks):
    for t in tasks:
        assert 1 <= int(t.optimal_len) <= env.max_actions_per_episode
        assert t.walls.shape == (6, 6) and t.walls.dtype == np.int8
        assert t.walls[0].all() and t.walls[-1].all() and t.walls[:, 0].all()
        assert int(t.boxes.sum()) == 1 == int(t.targets.sum())
        assert not (t.boxes & t.targets).sum() == t.boxes.sum()
        assert ref_bfs(t) == int(t.optimal_len)
    a = [env.generate_task(np.random.default_rng(5)) for _ in range(2)]
    for x, y in zip(a[0].values(), a[1].values()):
        np.testing.assert_array_equal(x, y)


def test_vmap_1024_matches_unbatched(env, tasks, jitted, single):
    reset, vstep = jitted
    n = 1024
    levels = [tasks[i % len(tasks)] for i in range(n)]
    state, ts = reset(jax.random.split(jax.random.key(1), n), stack_tasks(levels))
    reset1, step = single
    rng = np.random.default_rng(7)
    singles = [reset1(None, t)[0] for t in levels[:32]]
    for acts, num, fmt, inv in random_turns(rng, n, 3, env.max_actions_per_turn):
        state, ts = vstep(state, parsed_batch(acts, num, fmt, inv))
        for i in range(32):
            p = ParsedActions(
                actions=jnp.asarray(acts[i]), num=jnp.asarray(num[i]),
                format_ok=jnp.asarray(fmt[i]), num_invalid=jnp.asarray(inv[i]),
            )  # fmt: skip
            singles[i], t1 = step(singles[i], p)
            for name in ("reward", "done", "success", "obs_len", "num_actions", "invalid_action"):
                np.testing.assert_array_equal(t1[name], ts[name][i], err_msg=name)
            np.testing.assert_array_equal(t1.obs_tokens, ts.obs_tokens[i])
    assert ts.obs_tokens.shape == (n, env.max_obs_len)


def test_observation_tokens_match_text(env, tasks, single):
    reset, step = single
    tok = env.tokenizer
    unk = tok.token_to_id("<unk>")
    assert unknown_tokens(tok, env.system_prompt()) == []
    assert "<answer>Right || Right || Up</answer>" in env.system_prompt()
    for task in [*tasks[:5], parse_level(HAND_LEVELS[2])]:
        s, ts = reset(None, task)
        s, ts = step(s, ParsedActions.from_list([2, 0], 3))
        text = env.render_text(s)
        ids = np.asarray(ts.obs_tokens[: int(ts.obs_len)])
        assert ids.tolist() == tok.encode(text)
        assert unk not in ids
        assert "".join(tok.decode(ids).split()) == "".join(text.split())
        assert np.all(np.asarray(ts.obs_tokens[int(ts.obs_len) :]) == tok.pad_id)
        assert text.startswith("State:\n") and text.count("\n") == 6
    assert set(env.render_text(parse_level(HAND_LEVELS[2])).split()) >= {"S", "√", "X", "_", "#"}


def test_registry():
    from actfocus_jax import envs

    with pytest.raises(ValueError, match="sokoban"):
        envs.make("nope")
    assert set(envs.list_envs()) >= {"sokoban", "frozenlake", "sudoku", "webshop"}
    e = envs.make("sokoban", room_size=(5, 5), max_turns=2)
    assert e.room_size == (5, 5) and e.max_turns == 2 and e.max_obs_len == 3 + 25 + 4
