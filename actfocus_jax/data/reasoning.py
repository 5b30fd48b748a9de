"""Per-environment demonstration experts: replanning from any state, noise actions and reasoning text.

An *expert* (:class:`Expert` and its per-env subclasses, built by :func:`make_expert`) is a host-side
(Python / NumPy) helper used by :mod:`actfocus_jax.data.demos` to write supervised fine-tuning
demonstrations. For one unbatched env state (a pytree of NumPy arrays, e.g. ``jax.device_get(state)``)
it gives

* :meth:`Expert.task_from_state`: a task whose initial state is ``state``, so that ``env.solve`` can
  replan from anywhere in an episode (Sokoban: current walls / targets / boxes / player; FrozenLake:
  the player's tile becomes the start; Sudoku: the current grid becomes the puzzle);
* :meth:`Expert.plan`: the env's solver run from the state (Sudoku: the solver's fills reordered so
  that the most constrained cell comes first, which is what the reasoning explains);
* :meth:`Expert.random_action`: a random action different from the planned one (the imperfect
  demonstrations' noise);
* :meth:`Expert.reasoning`: short sentences in the embedded tokenizer's vocabulary that describe the
  state and exactly the actions *written in the answer* (noise included; 25-40 words, and a whole
  response stays within 48 tokens for 3 actions per turn). Examples::

    Sokoban:    I am at row 5 col 3 , box at row 4 col 3 , target at row 2 col 3 . I push it up
                onto the target . I go up , up .
    FrozenLake: I am at row 4 col 2 , goal at row 1 col 2 . There is a hole above and to the left .
                I go right , right , up .
    Sudoku:     row 1 col 3 : only 1 is missing . row 2 col 1 : 2 or 3 , I put 2 .

  Noise shows up as e.g. ``I cannot solve this . I try left .`` (Sokoban deadlock, no plan) or
  ``row 1 col 2 has 3 , I try 4 .`` (Sudoku move into a filled cell).

Coordinates in the text are 1-based ``row r col c`` with row 1 at the top and col 1 on the left, as
in the Sudoku system prompt. Every word used here is in :mod:`actfocus_jax.text.words` (the tests
check that demonstrations encode without ``<unk>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "Expert",
    "FrozenLakeExpert",
    "SokobanExpert",
    "SudokuExpert",
    "format_response",
    "make_expert",
    "task_from_state",
]

#: Reasoning words of the four grid directions, indexed by the direction's (drow, dcol).
_DIR_WORDS = {(-1, 0): "up", (1, 0): "down", (0, -1): "left", (0, 1): "right"}
_NEAR_WORDS = {(-1, 0): "above", (1, 0): "below", (0, -1): "to the left", (0, 1): "to the right"}


def _pos(rc: Sequence[int]) -> str:
    return f"row {int(rc[0]) + 1} col {int(rc[1]) + 1}"


def _join_list(items: Sequence[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a , b and c"``."""
    items = list(items)
    return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]


def format_response(reasoning: str, answers: Sequence[str], tags: dict[str, str]) -> str:
    """``<think> {reasoning} </think><answer>{A1} || {A2}</answer>`` with the tokenizer's ``tags``."""
    sep = f" {tags['action_sep']} "
    return (
        f"{tags['think_open']} {reasoning} {tags['think_close']}"
        f"{tags['answer_open']}{sep.join(answers)}{tags['answer_close']}"
    )


#: Reasoning styles: ``"plan"`` narrates the state *and* the actions written in the answer (the
#: decision is made in ``<think>`` and the answer copies it); ``"state"`` describes the state only
#: (Sokoban / FrozenLake: positions and nearby holes; Sudoku: the candidates of the cells the answer
#: fills), so the decision is made in the answer tokens.
REASONING_STYLES = ("plan", "state")


class Expert:
    """Host-side planner and narrator for one environment (see the module docstring).

    Args:
      env: a JAX environment (:class:`actfocus_jax.envs.base.JaxEnv`).
      style: reasoning style, one of :data:`REASONING_STYLES`.
    """

    def __init__(self, env: Any, style: str = "plan"):
        if style not in REASONING_STYLES:
            raise ValueError(f"reasoning style must be one of {REASONING_STYLES}, got {style!r}")
        self.env = env
        self.style = style
        self.num_actions = len(env.action_names)

    def task_from_state(self, state: Any) -> Any:
        """A task whose reset state equals ``state`` (board-wise)."""
        raise NotImplementedError

    def plan(self, state: Any) -> list[int] | None:
        """The env solver's action list from ``state``; None when it finds no solution."""
        plan = self.env.solve(self.task_from_state(state))
        return None if plan is None else [int(a) for a in plan]

    def random_action(
        self, state: Any, previous: Sequence[int], avoid: int | None, rng: np.random.Generator
    ) -> int:
        """A uniformly random action other than ``avoid`` (``previous``: this turn's earlier actions)."""
        del state, previous
        choices = [a for a in range(self.num_actions) if a != avoid]
        return int(choices[int(rng.integers(len(choices)))])

    def reasoning(self, state: Any, actions: Sequence[int], planned: bool) -> str:
        """Reasoning text for writing ``actions`` in ``state`` (``planned``: a solver plan existed)."""
        raise NotImplementedError

    def answer_texts(self, actions: Sequence[int]) -> list[str]:
        """The action strings of the answer span."""
        return [self.env.action_names[int(a)] for a in actions]


class SokobanExpert(Expert):
    """Sokoban: where the player, boxes and targets are, which way boxes get pushed, the moves."""

    def __init__(self, env: Any, style: str = "plan"):
        super().__init__(env, style)
        from actfocus_jax.envs.sokoban import DELTAS

        self.deltas = [tuple(int(x) for x in d) for d in DELTAS]
        self._apply_jit = None

    def _apply(self, state: Any, action: Any) -> Any:
        if self._apply_jit is None:
            self._apply_jit = jax.jit(self.env.apply_action)
        return self._apply_jit(state, action)

    def task_from_state(self, state: Any) -> Any:
        from actfocus_jax.envs.sokoban import SokobanTask

        return SokobanTask(
            walls=np.asarray(state.walls, np.int8),
            targets=np.asarray(state.targets, np.int8),
            boxes=np.asarray(state.boxes, np.int8),
            player=np.asarray(state.player, np.int32),
            optimal_len=np.array(-1, np.int32),
        )

    def reasoning(self, state: Any, actions: Sequence[int], planned: bool) -> str:
        boxes, targets = np.asarray(state.boxes) > 0, np.asarray(state.targets) > 0
        loose = [_pos(rc) for rc in np.argwhere(boxes & ~targets)]
        free = [_pos(rc) for rc in np.argwhere(targets & ~boxes)]
        where = f"I am at {_pos(np.asarray(state.player))}"
        if len(loose) == 1:
            where += f" , box at {loose[0]} , target at {free[0]}"
        elif loose:
            where += f" , boxes at {_join_list(loose)} , targets at {_join_list(free)}"
        parts = [where + " ."]
        if self.style == "state":
            return " ".join(parts + ([] if planned else ["I cannot solve this ."]))
        # Replay the written actions with the env's own rules to see which ones push a box.
        pushes: list[str] = []
        st = state
        for a in actions:
            new = jax.device_get(self._apply(st, np.int32(a))[0])
            if not np.array_equal(np.asarray(new.boxes), np.asarray(st.boxes)):
                word = _DIR_WORDS[self.deltas[int(a)]]
                if word not in pushes:
                    pushes.append(word)
            st = new
        if not planned:
            parts.append("I cannot solve this .")
        if pushes:
            end_boxes = np.asarray(st.boxes) > 0
            onto = " onto the target" if not np.any(end_boxes & ~targets) else ""
            parts.append(f"I push it {_join_list(pushes)}{onto} .")
        moves = " , ".join(_DIR_WORDS[self.deltas[int(a)]] for a in actions)
        parts.append(f"I go {moves} ." if planned else f"I try {moves} .")
        return " ".join(parts)


class FrozenLakeExpert(Expert):
    """FrozenLake: player and goal positions, the holes next to the player, the moves."""

    def __init__(self, env: Any, style: str = "plan"):
        super().__init__(env, style)
        from actfocus_jax.envs.frozenlake import DELTAS

        self.deltas = [tuple(int(x) for x in d) for d in DELTAS]

    def task_from_state(self, state: Any) -> Any:
        from actfocus_jax.envs.frozenlake import FrozenLakeTask

        return FrozenLakeTask(
            holes=np.asarray(state.holes, np.int8),
            start=np.asarray(state.player, np.int32),
            goal=np.asarray(state.goal, np.int32),
            optimal_len=np.array(-1, np.int32),
        )

    def reasoning(self, state: Any, actions: Sequence[int], planned: bool) -> str:
        holes = np.asarray(state.holes) > 0
        n = holes.shape[0]
        p = np.asarray(state.player)
        parts = [f"I am at {_pos(p)} , goal at {_pos(np.asarray(state.goal))} ."]
        near = []
        for d in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            r, c = int(p[0]) + d[0], int(p[1]) + d[1]
            if 0 <= r < n and 0 <= c < n and holes[r, c]:
                near.append(_NEAR_WORDS[d])
        parts.append(f"There is a hole {_join_list(near)} ." if near else "No hole is next to me .")
        if not planned:
            parts.append("I cannot reach the goal .")
        if self.style == "state":
            return " ".join(parts)
        moves = " , ".join(_DIR_WORDS[self.deltas[int(a)]] for a in actions)
        parts.append(f"I go {moves} ." if planned else f"I try {moves} .")
        return " ".join(parts)


class SudokuExpert(Expert):
    """Sudoku: for each written action, whether the cell is empty and which digits fit there."""

    def __init__(self, env: Any, style: str = "plan"):
        super().__init__(env, style)
        self.n, self.box = int(env.size), int(env.box_size)

    def task_from_state(self, state: Any) -> Any:
        from actfocus_jax.envs.sudoku import SudokuTask

        return SudokuTask(
            puzzle=np.asarray(state.grid, np.int8), solution=np.asarray(state.solution, np.int8)
        )

    def _decode(self, a: int) -> tuple[int, int, int]:
        cell, v = divmod(int(a), self.n)
        r, c = divmod(cell, self.n)
        return r, c, v + 1

    def candidates(self, grid: np.ndarray, r: int, c: int) -> list[int]:
        """Digits absent from the row, column and box of ``(r, c)`` in ``grid`` (0 = empty)."""
        b = self.box
        br, bc = (r // b) * b, (c // b) * b
        used = set(grid[r].tolist()) | set(grid[:, c].tolist())
        used |= set(grid[br : br + b, bc : bc + b].ravel().tolist())
        return [v for v in range(1, self.n + 1) if v not in used]

    def _after(self, state: Any, actions: Sequence[int]) -> np.ndarray:
        """The grid after ``actions`` under the env's rules (only correct values fill a cell)."""
        grid = np.array(state.grid, np.int32)
        sol = np.asarray(state.solution)
        for a in actions:
            r, c, v = self._decode(a)
            if grid[r, c] == 0 and sol[r, c] == v:
                grid[r, c] = v
        return grid

    def plan(self, state: Any) -> list[int] | None:
        """The solver's fills, most constrained cell first (ties in the solver's order)."""
        plan = super().plan(state)
        if not plan:
            return plan
        grid = np.array(state.grid, np.int32)
        left, ordered = list(plan), []
        while left:
            counts = [len(self.candidates(grid, *self._decode(a)[:2])) for a in left]
            a = left.pop(int(np.argmin(counts)))
            r, c, v = self._decode(a)
            grid[r, c] = v
            ordered.append(a)
        return ordered

    def random_action(
        self, state: Any, previous: Sequence[int], avoid: int | None, rng: np.random.Generator
    ) -> int:
        """A random value in a random still-empty cell (a plausible mistake), never ``avoid``."""
        grid = self._after(state, previous)
        empty = np.argwhere(grid == 0)
        for _ in range(100):
            if len(empty) == 0:
                break
            r, c = empty[int(rng.integers(len(empty)))]
            a = (int(r) * self.n + int(c)) * self.n + int(rng.integers(self.n))
            if a != avoid:
                return a
        return super().random_action(state, previous, avoid, rng)

    def reasoning(self, state: Any, actions: Sequence[int], planned: bool) -> str:
        parts = ["I cannot solve this ."] if not planned else []
        for i, a in enumerate(actions):
            grid = self._after(state, actions[:i])
            r, c, v = self._decode(a)
            where = f"row {r + 1} col {c + 1}"
            if grid[r, c] != 0:
                parts.append(
                    f"{where} has {int(grid[r, c])} ."
                    if self.style == "state"
                    else f"{where} has {int(grid[r, c])} , I try {v} ."
                )
                continue
            cands = self.candidates(grid, r, c)
            if self.style == "state":  # the candidates only; the answer picks the value
                parts.append(f"{where} : {' or '.join(str(x) for x in cands) or 'none'} .")
            elif cands == [v]:
                parts.append(f"{where} : only {v} is missing .")
            elif v in cands:
                options = " or ".join(str(x) for x in cands)
                parts.append(f"{where} : {options} , I put {v} .")
            else:
                parts.append(f"{where} : I try {v} .")
        return " ".join(parts)


_EXPERTS: dict[str, type[Expert]] = {
    "sokoban": SokobanExpert,
    "frozenlake": FrozenLakeExpert,
    "sudoku": SudokuExpert,
}


def make_expert(env: Any, style: str = "plan") -> Expert:
    """The :class:`Expert` of ``env`` (by ``env.name``) with reasoning ``style``."""
    cls = _EXPERTS.get(getattr(env, "name", ""))
    if cls is None:
        raise ValueError(
            f"no demonstration expert for env {getattr(env, 'name', env)!r}; "
            f"known: {sorted(_EXPERTS)}"
        )
    return cls(env, style)


def task_from_state(env: Any, state: Any) -> Any:
    """A task of ``env`` whose reset state is the unbatched ``state`` (see :class:`Expert`)."""
    return make_expert(env).task_from_state(jax.device_get(state))
