"""Sudoku 4x4: JAX env vs an independent plain-Python reference, puzzle uniqueness by brute force.

The reference implements the rules stated in ``actfocus_jax/envs/sudoku.py``'s docstring directly
(given / filled cell, row / column / box conflict, value not the solution's -> invalid move; completion
judged by checking that every row, column and box is a permutation of 1..4), not from the env's code.
Uniqueness is checked against the full list of valid 4x4 grids (288 of them), enumerated here.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax.envs import make
from actfocus_jax.envs.base import ParsedActions, stack_tasks, unknown_tokens
from actfocus_jax.envs.sudoku import SudokuEnv, SudokuTask, count_solutions, parse_grid

N = 4


def units():
    rows = [[(r, c) for c in range(N)] for r in range(N)]
    cols = [[(r, c) for r in range(N)] for c in range(N)]
    boxes = [
        [(br + i, bc + j) for i in range(2) for j in range(2)] for br in (0, 2) for bc in (0, 2)
    ]
    return rows + cols + boxes


UNITS = units()


def all_grids():
    """Every valid 4x4 Sudoku grid (brute force over row permutations)."""
    perms = list(itertools.permutations(range(1, N + 1)))
    out = []

    def rec(rows):
        if len(rows) == N:
            out.append(np.array(rows))
            return
        for p in perms:
            cand = [*rows, p]
            ok = all(len({row[c] for row in cand}) == len(cand) for c in range(N))
            if ok and len(cand) in (2, 4):
                a, b = cand[-2], cand[-1]
                ok = len({a[0], a[1], b[0], b[1]}) == 4 and len({a[2], a[3], b[2], b[3]}) == 4
            if ok:
                rec(cand)

    rec([])
    return np.stack(out)


@pytest.fixture(scope="module")
def grids():
    g = all_grids()
    assert len(g) == 288  # the known number of 4x4 Sudoku grids
    return g


def completions(puzzle, grids):
    """Grids consistent with the givens of ``puzzle`` (0 = empty)."""
    puzzle = np.asarray(puzzle)
    mask = puzzle > 0
    return grids[np.all((grids == puzzle) | ~mask, axis=(1, 2))]


class RefSudoku:
    """Plain-Python Sudoku episode (reference)."""

    def __init__(self, task, *, max_turns, cap, max_k=3, penalty=-0.1):
        self.grid = np.asarray(task.puzzle).astype(int).tolist()
        self.given = [[v > 0 for v in row] for row in self.grid]
        self.solution = np.asarray(task.solution).astype(int).tolist()
        self.max_turns, self.cap, self.penalty = max_turns, cap, penalty
        self.turn = self.num_actions = 0
        self.done = self.success = self.complete()

    def complete(self):
        return all(sorted(self.grid[r][c] for r, c in u) == [1, 2, 3, 4] for u in UNITS)

    def conflict(self, r, c, v):
        return any(
            self.grid[rr][cc] == v
            for u in UNITS
            if (r, c) in u
            for rr, cc in u
            if (rr, cc) != (r, c)
        )

    def move(self, r, c, v):
        """Returns (reward, valid)."""
        if self.given[r][c] or self.grid[r][c] != 0:
            return -0.1, False
        if self.conflict(r, c, v) or self.solution[r][c] != v:
            return -0.1, False
        self.grid[r][c] = v
        if self.complete():
            self.done = self.success = True
            return 1.1, True
        return 0.1, True

    def step(self, actions, format_ok, num_invalid):
        """``actions``: list of (row, col, value), 0-based row/col. Returns (reward, invalid)."""
        if self.done:
            return 0.0, 0
        self.turn += 1
        reward, invalid = 0.0, 0
        if not format_ok or num_invalid > 0 or not actions:
            reward, invalid = self.penalty, max(num_invalid, 1)
        else:
            for r, c, v in actions:
                if self.done or self.num_actions >= self.cap:
                    break
                rew, ok = self.move(r, c, v)
                reward += rew
                invalid += not ok
                self.num_actions += 1
                if self.num_actions >= self.cap:
                    self.done = True
        if self.turn >= self.max_turns:
            self.done = True
        return reward, invalid

    def text(self):
        return "State:\n" + "\n".join(
            " ".join(str(v) if v else "." for v in row) for row in self.grid
        )


@pytest.fixture(scope="module")
def env():
    return make("sudoku")


def index(r, c, v):
    return (r * N + c) * N + (v - 1)


def random_turns(rng, tasks, n_turns, k):
    """Random answers [T, B]; some bad formats. Even episodes mostly play the blanks' solution values
    in random order (so some get solved), odd ones play random cells, half with the right value."""
    b = len(tasks)
    acts = np.full((n_turns, b, k), -1, np.int32)
    num = np.zeros((n_turns, b), np.int32)
    fmt = np.ones((n_turns, b), bool)
    inv = np.zeros((n_turns, b), np.int32)
    for i, task in enumerate(tasks):
        blanks = [tuple(x) for x in np.argwhere(np.asarray(task.puzzle) == 0).tolist()]
        plan = [blanks[j] for j in rng.permutation(len(blanks))] if i % 2 == 0 else []
        for t in range(n_turns):
            m = int(rng.integers(1, k + 1))
            for j in range(m):
                if plan and rng.random() < 0.85:
                    r, c = plan.pop(0)
                    v = int(task.solution[r, c])
                else:
                    r, c = (int(x) for x in rng.integers(0, N, 2))
                    v = (
                        int(task.solution[r, c])
                        if rng.random() < 0.5
                        else int(rng.integers(1, N + 1))
                    )
                acts[t, i, j] = index(r, c, v)
            num[t, i] = m
            u = rng.random()
            if u < 0.08:
                fmt[t, i] = False
            elif u < 0.16:
                inv[t, i] = 1
    return acts, num, fmt, inv


def test_matches_reference(env):
    rng = np.random.default_rng(0)
    tasks = [env.generate_task(rng) for _ in range(48)]
    turns = env.max_turns + 1
    acts, num, fmt, inv = random_turns(rng, tasks, turns, env.max_actions_per_turn)
    state, ts = jax.jit(jax.vmap(env.reset))(jnp.zeros((48, 2), jnp.uint32), stack_tasks(tasks))
    step = jax.jit(jax.vmap(env.step))
    refs = [RefSudoku(t, max_turns=env.max_turns, cap=env.max_actions_per_episode) for t in tasks]
    tok = env.tokenizer
    for b, ref in enumerate(refs):
        assert ts.obs_tokens[b, : ts.obs_len[b]].tolist() == tok.encode(ref.text())
    n_invalid_moves = 0
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
            moves = [(a // 16, (a // 4) % 4, a % 4 + 1) for a in acts[t, b, : num[t, b]].tolist()]
            reward, invalid = ref.step(moves, fmt[t, b], inv[t, b])
            if fmt[t, b] and inv[t, b] == 0:
                n_invalid_moves += invalid
            assert ts.reward[b] == pytest.approx(reward, abs=1e-5), (t, b)
            assert ts.invalid_action[b] == invalid, (t, b)
            assert bool(ts.done[b]) == ref.done and bool(ts.success[b]) == ref.success, (t, b)
            assert ts.num_actions[b] == ref.num_actions and ts.turn[b] == ref.turn
            obs = ts.obs_tokens[b, : ts.obs_len[b]].tolist()
            assert obs == tok.encode(ref.text()), (t, b)
    assert n_invalid_moves > 0 and any(r.success for r in refs)


def test_rules_givens_conflicts_completion(env):
    puzzle = parse_grid("1 . 3 .\n. 4 . 2\n2 . 4 .\n. 3 . 1")
    solution = parse_grid("1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1")
    task = SudokuTask(puzzle=puzzle, solution=solution)
    state, ts = env.reset(jnp.zeros(2, jnp.uint32), task)
    step = jax.jit(env.step)
    assert env.render_text(state) == "State:\n1 . 3 .\n. 4 . 2\n2 . 4 .\n. 3 . 1"

    def turn(state, text):
        return step(state, env.parse_text(f"<think> ok </think><answer>{text}</answer>"))

    # rule cases on a sparse grid (only (1,1) = 1 given), so each conflict kind is isolated
    sparse = SudokuTask(puzzle=parse_grid("1...\n....\n....\n...."), solution=solution)
    sparse_state, _ = env.reset(jnp.zeros(2, jnp.uint32), sparse)
    cases = {
        "1 1 1": "given cell (same value)",
        "1 1 2": "given cell",
        "1 3 1": "row conflict only",
        "3 1 1": "column conflict only",
        "2 2 1": "box conflict only",
        "2 1 2": "no conflict but not the solution's value",
    }
    for text, why in cases.items():
        new, ts = turn(sparse_state, text)
        assert float(ts.reward) == pytest.approx(-0.1), why
        assert ts.invalid_action == 1 and ts.num_actions == 1 and not ts.done, why
        np.testing.assert_array_equal(new.grid, sparse_state.grid)
    new, ts = turn(sparse_state, "2 1 3")
    assert float(ts.reward) == pytest.approx(0.1) and ts.invalid_action == 0 and new.grid[1, 0] == 3
    # right values: +0.1 each; mixed with a wrong one: the wrong one costs -0.1, grid keeps the rest
    new, ts = turn(state, "1 2 2 || 1 4 4 || 2 1 1")
    assert float(ts.reward) == pytest.approx(0.1 + 0.1 - 0.1) and ts.invalid_action == 1
    assert new.grid[0].tolist() == [1, 2, 3, 4] and new.grid[1, 0] == 0
    new, ts = turn(new, "1 2 2")  # already filled
    assert ts.invalid_action == 1 and float(ts.reward) == pytest.approx(-0.1)
    new, ts = turn(new, "2 1 3 || 2 3 1 || 3 2 1")
    assert float(ts.reward) == pytest.approx(0.3) and not ts.done
    new, ts = turn(new, "3 4 3 || 4 1 4 || 4 3 2")
    assert float(ts.reward) == pytest.approx(1.3) and ts.done and ts.success
    np.testing.assert_array_equal(new.grid, solution)
    # format errors: penalty, no move, counted
    for text in ("1 2", "1 2 3 4", "Up", "1 2 5", ""):
        new, ts = turn(state, text)
        assert float(ts.reward) == pytest.approx(-0.1) and ts.invalid_action >= 1, text
        assert ts.num_actions == 0 and ts.turn == 1, text
        np.testing.assert_array_equal(new.grid, state.grid)
    new, ts = step(state, env.parse_text("no answer 1 2 2"))
    assert float(ts.reward) == pytest.approx(-0.1) and ts.invalid_action == 1


def test_generated_puzzles_unique(grids):
    rng = np.random.default_rng(1)
    for givens in (4, 6, 10, 14):
        e = SudokuEnv(num_givens=givens)
        for _ in range(6):
            t = e.generate_task(rng)
            assert int((t.puzzle > 0).sum()) == givens
            sols = completions(t.puzzle, grids)
            assert len(sols) == 1, givens
            np.testing.assert_array_equal(sols[0], t.solution)
            assert t.puzzle.dtype == np.int8 and t.puzzle.shape == (4, 4)


def test_count_solutions_vs_brute_force(grids):
    rng = np.random.default_rng(2)
    for _ in range(60):
        g = grids[rng.integers(len(grids))].copy()
        g[rng.random((4, 4)) < rng.uniform(0.3, 0.9)] = 0
        if rng.random() < 0.3:  # possibly conflicting givens
            g[rng.integers(4), rng.integers(4)] = rng.integers(1, 5)
        expected = len(completions(g, grids))
        assert count_solutions(g, limit=1000) == expected
        assert count_solutions(g, limit=2) == min(expected, 2)


def test_solver_replays(env):
    rng = np.random.default_rng(3)
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    k = env.max_actions_per_turn
    for _ in range(10):
        task = env.generate_task(rng)
        sol = env.solve(task)
        assert len(sol) == env.num_blanks == 6
        state, ts = reset(jnp.zeros(2, jnp.uint32), task)
        total = 0.0
        for i in range(0, len(sol), k):
            state, ts = step(state, ParsedActions.from_list(sol[i : i + k], k))
            total += float(ts.reward)
        assert ts.done and ts.success and ts.invalid_action == 0
        assert total == pytest.approx(6 * 0.1 + 1.0)
        np.testing.assert_array_equal(state.grid, task.solution)


def test_action_table_and_parsing(env):
    assert len(env.action_names) == 64 and env.action_table.num_actions == 64
    assert env.action_names[index(0, 1, 3)] == "1 2 3"
    assert sorted(set(env.action_table.action_ids.tolist())) == list(range(64))
    assert env.action_table.tokens.shape[1] == 3
    p = env.parse_text("<think> fill </think><answer>1 2 3 || 2 4 1</answer>")
    assert p.format_ok and p.num == 2 and p.num_invalid == 0
    assert p.actions.tolist() == [index(0, 1, 3), index(1, 3, 1), -1]


def test_defaults_and_config():
    e = SudokuEnv()
    assert (e.num_givens, e.max_actions_per_turn, e.max_actions_per_episode, e.max_turns) == (
        10,
        3,
        10,
        5,
    )
    e = SudokuEnv(num_givens=6, fill_reward=0.0, solve_reward=10.0)
    assert e.max_actions_per_episode == 14 and e.max_turns == 6
    with pytest.raises(ValueError, match="num_givens"):
        SudokuEnv(num_givens=3)


def test_vmap_1024_matches_unbatched(env):
    rng = np.random.default_rng(4)
    base = [env.generate_task(rng) for _ in range(16)]
    b = 1024
    tasks = [base[i % 16] for i in range(b)]
    acts, num, fmt, inv = random_turns(rng, tasks, 2, env.max_actions_per_turn)

    def episode(task, acts, num, fmt, inv):
        state, _ = env.reset(jnp.zeros(2, jnp.uint32), task)
        outs = []
        for t in range(2):
            parsed = ParsedActions(
                actions=acts[t], num=num[t], format_ok=fmt[t], num_invalid=inv[t]
            )
            state, ts = env.step(state, parsed)
            outs.append(ts)
        return state, outs

    args = (stack_tasks(tasks), *(np.swapaxes(x, 0, 1) for x in (acts, num, fmt, inv)))
    batched = jax.jit(jax.vmap(episode))(*args)
    looped = jax.jit(lambda *a: jax.lax.map(lambda x: episode(*x), a))(*args)
    jax.tree_util.tree_map(np.testing.assert_array_equal, batched, looped)
    single = jax.jit(episode)
    for i in (0, 5, 700, 1023):
        one = single(*(jax.tree_util.tree_map(lambda x, i=i: x[i], a) for a in args))
        ref = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        jax.tree_util.tree_map(np.testing.assert_array_equal, one, ref)


def test_text_vocab_and_decode(env):
    tok = env.tokenizer
    assert unknown_tokens(tok, env.system_prompt()) == []
    assert unknown_tokens(tok, SudokuEnv(box_size=3, num_givens=40).system_prompt()) == []
    rng = np.random.default_rng(5)
    for _ in range(6):
        task = env.generate_task(rng)
        state, ts = env.reset(jnp.zeros(2, jnp.uint32), task)
        text = env.render_text(state)
        assert text == env.render_text(task)
        ids = np.asarray(ts.obs_tokens)[: int(ts.obs_len)].tolist()
        assert tok.token_to_id("<unk>") not in ids
        assert ids == tok.encode(text)
        assert "".join(tok.decode(ids).split()) == "".join(text.split())
    assert ts.obs_tokens.shape == (env.max_obs_len,)


def test_nine_by_nine_generation_unique():
    e = SudokuEnv(box_size=3, num_givens=45)
    t = e.generate_task(np.random.default_rng(6))
    assert int((t.puzzle > 0).sum()) == 45 and count_solutions(t.puzzle, limit=2) == 1
    assert len(e.action_names) == 729
