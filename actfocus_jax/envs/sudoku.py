"""Sudoku (4x4 by default) in pure JAX, with puzzles that have a unique solution.

RAGEN has no Sudoku environment, so the rules and rewards below are the project's own definition.

Grid: ``n x n`` with ``n = box_size**2`` (default ``box_size=2``: 4x4 grid, 2x2 boxes, digits 1..4).
Each row, column and box must hold every digit once (standard Sudoku rules).

Actions: ``"r c v"`` = write value ``v`` into row ``r``, column ``c`` (1-based digits, three tokens;
``<answer>1 2 3 || 2 4 1</answer>`` holds two actions). The action table has ``n**3`` entries (64 for
4x4); action index ``((r - 1) * n + (c - 1)) * n + (v - 1)``.

Rules and rewards (per executed action):

* placing the solution's value into an empty cell fills it: ``fill_reward`` (+0.1);
* anything else -- writing into a given or already filled cell, a value that conflicts with its row,
  column or box, or a value that is consistent so far but differs from the (unique) solution -- is an
  *invalid move*: ``invalid_move_penalty`` (-0.1), the grid is unchanged, the action still counts
  towards the per-episode cap, and it is counted in ``Timestep.invalid_action`` (together with the
  turn's unparsable segments). Because the solution is unique, a non-solution value can never be
  completed into a valid grid, so rejecting it early is the principled choice and keeps every reached
  grid consistent;
* filling the last empty cell gives ``solve_reward`` (+1, FrozenLake's success scale) on top and ends
  the episode with ``success``;
* every executed action additionally costs ``step_penalty`` (default 0.0).

Invalid or unparsable answers: ``format_penalty`` (-0.1) and no move (shared turn semantics of
:mod:`actfocus_jax.envs.base`).

Limits: ``max_actions_per_turn=3``; ``max_actions_per_episode`` defaults to ``blanks + action_slack``
(``action_slack=4``; 10 for the default 10 givens, as in the other envs); ``max_turns`` defaults to
``ceil(max_actions_per_episode / max_actions_per_turn) + 1`` (5 by default: one spare turn for a
format error).

Symbols: the digits and ``.`` for an empty cell. Observation text: ``"State:\\n"`` then the grid,
cells separated by spaces, rows by newlines (:class:`~actfocus_jax.envs.base.GridRenderer`).

Puzzle generation (:meth:`SudokuEnv.generate_task`, host, NumPy; our own implementation): a random
full grid by randomised backtracking, then cells are removed in random order, each removal kept only
if the puzzle still has a unique solution (backtracking solution counter with early stop at 2,
:func:`count_solutions`), until ``num_givens`` givens remain (default 10: 6 blanks). When a removal
order gets stuck above the target (every further removal would break uniqueness) a new full grid and
order are drawn, up to ``max_generation_attempts`` times, then a ``RuntimeError`` is raised; so every
generated puzzle has exactly ``num_givens`` givens and a unique solution. A 4x4 Sudoku needs at least
4 givens for a unique solution, so ``num_givens < 4`` (4x4) is rejected at construction.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.envs.base import GridRenderer, JaxEnv, ParsedActions, Timestep
from actfocus_jax.text.tokenizer import TextTokenizer

__all__ = [
    "SudokuEnv",
    "SudokuState",
    "SudokuTask",
    "action_index",
    "action_names",
    "count_solutions",
    "decode_action",
    "parse_grid",
]

EMPTY_SYMBOL = "."
HEADER = "State:\n"
#: Fewest givens of a uniquely solvable puzzle, per box size (4x4: 4, 9x9: 17).
MIN_GIVENS = {2: 4, 3: 17}


def action_names(n: int) -> tuple[str, ...]:
    """``"r c v"`` names of the ``n**3`` actions, in index order (1-based digits)."""
    return tuple(
        f"{r} {c} {v}" for r in range(1, n + 1) for c in range(1, n + 1) for v in range(1, n + 1)
    )


def action_index(row: int, col: int, value: int, n: int = 4) -> int:
    """Index of the action writing ``value`` (1..n) at 0-based ``(row, col)``."""
    return (row * n + col) * n + (value - 1)


def decode_action(index: int, n: int = 4) -> tuple[int, int, int]:
    """``(row, col, value)`` (0-based row/col, value 1..n) of action ``index``."""
    cell, v = divmod(int(index), n)
    r, c = divmod(cell, n)
    return r, c, v + 1


def _candidates(grid: np.ndarray, r: int, c: int, box: int) -> list[int]:
    n = grid.shape[0]
    br, bc = (r // box) * box, (c // box) * box
    used = set(grid[r, :].tolist()) | set(grid[:, c].tolist())
    used |= set(grid[br : br + box, bc : bc + box].ravel().tolist())
    return [v for v in range(1, n + 1) if v not in used]


def count_solutions(grid: np.ndarray, limit: int = 2) -> int:
    """Number of completions of ``grid`` int[n, n] (0 = empty), capped at ``limit`` (early stop).

    Backtracking on the empty cell with the fewest candidates. Givens that already conflict give 0.
    """
    grid = np.array(grid, np.int64)
    n = grid.shape[0]
    box = math.isqrt(n)
    for r in range(n):
        for c in range(n):
            v = grid[r, c]
            if v:
                grid[r, c] = 0
                ok = v in _candidates(grid, r, c, box)
                grid[r, c] = v
                if not ok:
                    return 0

    def rec(budget: int) -> int:
        best, best_cands = None, None
        for r in range(n):
            for c in range(n):
                if grid[r, c] == 0:
                    cands = _candidates(grid, r, c, box)
                    if best is None or len(cands) < len(best_cands):
                        best, best_cands = (r, c), cands
                        if not cands:
                            return 0
        if best is None:
            return 1
        total = 0
        for v in best_cands:
            grid[best] = v
            total += rec(budget - total)
            grid[best] = 0
            if total >= budget:
                break
        return total

    return rec(limit)


def _random_full_grid(rng: np.random.Generator, box: int) -> np.ndarray:
    """A uniformly-ordered random complete grid by randomised backtracking."""
    n = box * box
    grid = np.zeros((n, n), np.int64)

    def rec(i: int) -> bool:
        if i == n * n:
            return True
        r, c = divmod(i, n)
        cands = _candidates(grid, r, c, box)
        for v in rng.permutation(cands).tolist():
            grid[r, c] = v
            if rec(i + 1):
                return True
        grid[r, c] = 0
        return False

    rec(0)
    return grid


@chex.dataclass
class SudokuTask:
    """A puzzle (NumPy arrays; stack along a leading axis for a batch).

    Attributes:
      puzzle: int8[n, n] givens, 0 = empty.
      solution: int8[n, n] the unique solution.
    """

    puzzle: np.ndarray
    solution: np.ndarray


@chex.dataclass
class SudokuState:
    """Env state (arrays; a leading batch axis under ``vmap``).

    Attributes:
      grid: int8[n, n] current values, 0 = empty.
      given: bool[n, n] cells given by the puzzle.
      solution: int8[n, n].
      invalid_moves: int32[] invalid moves executed so far (wrong value / filled cell).
      num_actions: int32[]; turn: int32[]; done: bool[]; success: bool[].
    """

    grid: jax.Array
    given: jax.Array
    solution: jax.Array
    invalid_moves: jax.Array
    num_actions: jax.Array
    turn: jax.Array
    done: jax.Array
    success: jax.Array


def parse_grid(text: str) -> np.ndarray:
    """int8[n, n] from rows of digits and ``.`` / ``0`` for empty (cells optionally space-separated)."""
    rows = [
        line.split() if " " in line.strip() else list(line.strip()) for line in text.split("\n")
    ]
    rows = [r for r in rows if r]
    return np.array([[0 if s in (".", "0") else int(s) for s in row] for row in rows], np.int8)


class SudokuEnv(JaxEnv):
    """Sudoku (see the module docstring for rules, rewards, limits and generation).

    Args:
      tokenizer: a ``TextTokenizer``; None = the embedded tokenizer.
      box_size: side of a box (default 2: 4x4 Sudoku). The grid side is ``box_size**2`` (at most 9).
      num_givens: givens per generated puzzle (default 10; sets the difficulty).
      max_turns: turns per episode (default: see the module docstring).
      max_actions_per_turn: actions per answer (default 3).
      max_actions_per_episode: action cap (default ``blanks + action_slack``).
      action_slack: extra actions over the number of blanks (default 4).
      format_penalty: reward of an invalid turn (default -0.1).
      fill_reward / invalid_move_penalty / solve_reward / step_penalty: rewards (0.1, -0.1, 1.0, 0.0).
      max_generation_attempts: full grids tried before :meth:`generate_task` raises.

    Shapes: ``state.grid`` int8[n, n]; ``Timestep.obs_tokens`` int32[max_obs_len].
    """

    name = "sudoku"

    def __init__(
        self,
        tokenizer: TextTokenizer | None = None,
        *,
        box_size: int = 2,
        num_givens: int = 10,
        max_turns: int | None = None,
        max_actions_per_turn: int = 3,
        max_actions_per_episode: int | None = None,
        action_slack: int = 4,
        format_penalty: float = -0.1,
        fill_reward: float = 0.1,
        invalid_move_penalty: float = -0.1,
        solve_reward: float = 1.0,
        step_penalty: float = 0.0,
        max_generation_attempts: int = 1000,
    ):
        self.box_size = int(box_size)
        if not 2 <= self.box_size <= 3:
            raise ValueError(f"box_size must be 2 (4x4) or 3 (9x9), got {box_size}")
        n = self.size = self.box_size**2
        self.num_givens = int(num_givens)
        if not MIN_GIVENS[self.box_size] <= self.num_givens <= n * n:
            raise ValueError(
                f"num_givens must be in [{MIN_GIVENS[self.box_size]}, {n * n}] for a {n}x{n} "
                f"Sudoku (fewer givens never have a unique solution), got {num_givens}"
            )
        self.num_blanks = n * n - self.num_givens
        if max_actions_per_episode is None:
            max_actions_per_episode = max(1, self.num_blanks + int(action_slack))
        if max_turns is None:
            max_turns = math.ceil(max_actions_per_episode / max_actions_per_turn) + 1
        self.action_names = action_names(n)
        super().__init__(
            tokenizer,
            max_turns=max_turns,
            max_actions_per_turn=max_actions_per_turn,
            max_actions_per_episode=max_actions_per_episode,
            format_penalty=format_penalty,
        )
        self.fill_reward = float(fill_reward)
        self.invalid_move_penalty = float(invalid_move_penalty)
        self.solve_reward = float(solve_reward)
        self.step_penalty = float(step_penalty)
        self.max_generation_attempts = int(max_generation_attempts)
        symbols = (EMPTY_SYMBOL, *(str(v) for v in range(1, n + 1)))
        self.renderer = GridRenderer(self.tokenizer, symbols, n, n, HEADER)

    # --- static info ---------------------------------------------------------------------------

    @property
    def max_obs_len(self) -> int:
        return self.renderer.max_len

    def system_prompt(self) -> str:
        """Rules, symbols and the answer format (every word is in the embedded vocabulary)."""
        n, b = self.size, self.box_size
        return (
            f"You are solving a {n}x{n} Sudoku puzzle. Fill every empty cell with a digit from 1 "
            f"to {n} so that each row, each column and each {b}x{b} box holds every digit once.\n"
            "Symbols: . is an empty cell, the digits are values. Rows and columns are numbered "
            f"from 1 to {n}, row 1 at the top and column 1 on the left.\n"
            "Actions: r c v writes the value v into row r and column c, for example 2 3 4 "
            "writes 4 into row 2, column 3.\n"
            f"Rewards: +{self.fill_reward:g} for a correct value, {self.invalid_move_penalty:g} "
            "for a wrong value or a cell that is not empty (the grid does not change), "
            f"+{self.solve_reward:g} when the puzzle is solved.\n"
            f"You can give up to {self.max_actions_per_turn} actions per turn and "
            f"{self.max_actions_per_episode} actions in total.\n"
            "Answer format: <think> your reasoning </think><answer> actions separated by || "
            "</answer>, for example <answer>1 2 3 || 2 4 1</answer>"
        )

    # --- device API ----------------------------------------------------------------------------

    def reset(self, key: jax.Array, task: SudokuTask) -> tuple[SudokuState, Timestep]:
        """Starts an episode on ``task`` (``key`` is unused: Sudoku is deterministic)."""
        del key
        grid = jnp.asarray(task.puzzle, jnp.int8)
        solved = jnp.all(grid > 0)
        state = SudokuState(
            grid=grid,
            given=grid > 0,
            solution=jnp.asarray(task.solution, jnp.int8),
            invalid_moves=jnp.zeros((), jnp.int32),
            num_actions=jnp.zeros((), jnp.int32),
            turn=jnp.zeros((), jnp.int32),
            done=solved,
            success=solved,
        )
        return state, self.make_timestep(state, self.observation(state))

    def step(self, state: SudokuState, parsed: ParsedActions) -> tuple[SudokuState, Timestep]:
        """Runs one turn (see :meth:`JaxEnv.run_turn`); invalid moves add to ``invalid_action``."""
        new, reward, invalid = self.run_turn(state, parsed, self.apply_action)
        invalid = invalid + (new.invalid_moves - state.invalid_moves)
        return new, self.make_timestep(new, self.observation(new), reward, invalid)

    def observation(self, state: SudokuState) -> tuple[jax.Array, jax.Array]:
        """(int32[max_obs_len] token ids, int32[] length) of :meth:`render_text`."""
        return self.renderer.tokens(state.grid.astype(jnp.int32))

    def apply_action(self, state: SudokuState, action: jax.Array):
        """One ``r c v`` action -> ``(state, reward, terminal, success)`` (pure, unbatched)."""
        n = self.size
        cell, v0 = jnp.divmod(action, n)
        r, c = jnp.divmod(cell, n)
        value = (v0 + 1).astype(jnp.int8)
        empty = state.grid[r, c] == 0
        correct = empty & (state.solution[r, c] == value)
        grid = jnp.where(correct, state.grid.at[r, c].set(value), state.grid)
        solved = jnp.all(grid > 0)
        reward = (
            self.step_penalty
            + jnp.where(correct, self.fill_reward, self.invalid_move_penalty)
            + jnp.where(correct & solved, self.solve_reward, 0.0)
        )
        new = state.replace(
            grid=grid, invalid_moves=state.invalid_moves + (~correct).astype(jnp.int32)
        )
        return new, reward.astype(jnp.float32), solved, solved

    # --- host API ------------------------------------------------------------------------------

    def render_text(self, state: SudokuState | SudokuTask) -> str:
        """Observation text of one unbatched state (or task)."""
        grid = state.grid if hasattr(state, "grid") else state.puzzle
        return self.renderer.text(np.asarray(grid, np.int32))

    def solve(self, task: SudokuTask) -> list[int]:
        """Reference solution: fills the blanks in row-major order with the solution's values."""
        puzzle, solution = np.asarray(task.puzzle), np.asarray(task.solution)
        n = self.size
        return [
            action_index(r, c, int(solution[r, c]), n)
            for r in range(n)
            for c in range(n)
            if puzzle[r, c] == 0
        ]

    def generate_task(self, rng: np.random.Generator) -> SudokuTask:
        """A puzzle with exactly ``num_givens`` givens and a unique solution (module docstring)."""
        n = self.size
        for _ in range(self.max_generation_attempts):
            solution = _random_full_grid(rng, self.box_size)
            puzzle = solution.copy()
            givens = n * n
            for cell in rng.permutation(n * n).tolist():
                if givens == self.num_givens:
                    break
                r, c = divmod(cell, n)
                puzzle[r, c] = 0
                if count_solutions(puzzle, limit=2) == 1:
                    givens -= 1
                else:
                    puzzle[r, c] = solution[r, c]
            if givens == self.num_givens:
                return SudokuTask(puzzle=puzzle.astype(np.int8), solution=solution.astype(np.int8))
        raise RuntimeError(
            f"no uniquely solvable puzzle with {self.num_givens} givens found in "
            f"{self.max_generation_attempts} attempts; use more givens"
        )


ENV_CLASS = SudokuEnv
