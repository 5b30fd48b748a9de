"""Sokoban in pure JAX (gym-sokoban rules, RAGEN's SimpleSokoban defaults).

Rules (gym-sokoban, ``SokobanEnv._push`` / ``_move`` / ``_calc_reward``, as wrapped by RAGEN's
``SokobanEnv``): four actions ``Up, Down, Left, Right`` (indices 0..3; gym-sokoban's "push" actions,
which move the player or push a box). A move onto floor or a target moves the player. A move into a
box pushes it when the cell behind the box is floor or an empty target; a move into a wall, or into a
box with a wall or another box behind it, leaves the state unchanged. Every action costs the step
penalty, moved or not.

Rewards (gym-sokoban / RAGEN ``config/envs.yaml``): -0.1 per action, +1 when the number of boxes on
targets increases, -1 when it decreases, +10 when all boxes are on targets (the episode then ends
with ``success``). Invalid or unparsable answers: ``format_penalty`` (-0.1) and no move (see
:mod:`actfocus_jax.envs.base` for the shared turn semantics).

Limits (SimpleSokoban): 6x6 room, 1 box, at most 10 actions per episode; ``max_turns=5`` and
``max_actions_per_turn=3`` (RAGEN-like; both configurable). gym-sokoban's own 100-step cap
(``max_steps``) never binds under the 10-action cap and is not modelled separately.

Symbols (RAGEN's ``grid_lookup``): ``#`` wall, ``_`` floor, ``O`` target, ``X`` box, ``√`` box on
target, ``P`` player, ``S`` player on target. Observation text: ``"State:\\n"`` then the grid, cells
separated by spaces, rows by newlines (:class:`~actfocus_jax.envs.base.GridRenderer`).

Level generation (:meth:`SokobanEnv.generate_task`, host, NumPy; our own implementation of the
gym-sokoban recipe): a random walk carves floor in a walled room, targets and the player are placed
on random floor cells with the boxes on the targets, then reverse play (the player walks randomly and
pulls boxes away from the targets) scrambles the level, which is thus solvable by construction. Levels
already solved, or whose optimal solution (BFS, :meth:`SokobanEnv.solve`) is shorter than
``min_solution_len`` or longer than ``max_solution_len`` (default: the per-episode action cap, so
every level is solvable within the budget) are rejected and redrawn. Deterministic given the rng.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.envs.base import GridRenderer, JaxEnv, ParsedActions, Timestep
from actfocus_jax.text.tokenizer import TextTokenizer

__all__ = [
    "ACTIONS",
    "SYMBOLS",
    "SokobanEnv",
    "SokobanState",
    "SokobanTask",
    "cell_codes",
    "parse_level",
]

ACTIONS = ("Up", "Down", "Left", "Right")
#: (row, col) displacement of each action.
DELTAS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)
#: Symbol of each cell code (gym-sokoban's room_state numbering plus RAGEN's 6 = player on target).
SYMBOLS = ("#", "_", "O", "√", "X", "P", "S")
WALL, FLOOR, TARGET, BOX_ON_TARGET, BOX, PLAYER, PLAYER_ON_TARGET = range(7)
HEADER = "State:\n"


@chex.dataclass
class SokobanTask:
    """A level (NumPy arrays; stack along a leading axis for a batch).

    Attributes:
      walls: int8[H, W] 1 = wall.
      targets: int8[H, W] 1 = target.
      boxes: int8[H, W] 1 = box.
      player: int32[2] (row, col) of the player.
      optimal_len: int32[] optimal solution length (-1 if unknown).
    """

    walls: np.ndarray
    targets: np.ndarray
    boxes: np.ndarray
    player: np.ndarray
    optimal_len: np.ndarray


@chex.dataclass
class SokobanState:
    """Env state (arrays; a leading batch axis under ``vmap``).

    Attributes:
      walls, targets, boxes: int8[H, W].
      player: int32[2].
      num_actions: int32[] actions executed in the episode.
      turn: int32[] turns taken.
      done: bool[]; success: bool[].
    """

    walls: jax.Array
    targets: jax.Array
    boxes: jax.Array
    player: jax.Array
    num_actions: jax.Array
    turn: jax.Array
    done: jax.Array
    success: jax.Array


def parse_level(text: str) -> SokobanTask:
    """Builds a task from the env's symbols (rows on lines, cells optionally space-separated).

    Example: ``"# # # #\\n# P X O\\n# # # #"``. ``optimal_len`` is set to -1.
    """
    rows = [
        line.split() if " " in line.strip() else list(line.strip()) for line in text.split("\n")
    ]
    rows = [r for r in rows if r]
    h, w = len(rows), max(len(r) for r in rows)
    walls = np.ones((h, w), np.int8)
    targets = np.zeros((h, w), np.int8)
    boxes = np.zeros((h, w), np.int8)
    player = None
    for r, row in enumerate(rows):
        for c, s in enumerate(row):
            if s not in SYMBOLS:
                raise ValueError(f"unknown symbol {s!r} at ({r}, {c}); use {SYMBOLS}")
            code = SYMBOLS.index(s)
            walls[r, c] = code == WALL
            targets[r, c] = code in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET)
            boxes[r, c] = code in (BOX, BOX_ON_TARGET)
            if code in (PLAYER, PLAYER_ON_TARGET):
                player = (r, c)
    if player is None:
        raise ValueError("level has no player (P or S)")
    return SokobanTask(
        walls=walls,
        targets=targets,
        boxes=boxes,
        player=np.array(player, np.int32),
        optimal_len=np.array(-1, np.int32),
    )


def cell_codes(walls, targets, boxes, player, xp=jnp):
    """int32[H, W] symbol codes (indices into :data:`SYMBOLS`) of a state; ``xp`` is jnp or np."""
    h, w = walls.shape
    rr, cc = xp.arange(h)[:, None], xp.arange(w)[None, :]
    is_p = (rr == player[0]) & (cc == player[1])
    t, b = targets > 0, boxes > 0
    code = xp.where(t, TARGET, FLOOR)
    code = xp.where(is_p, xp.where(t, PLAYER_ON_TARGET, PLAYER), code)
    code = xp.where(b, xp.where(t, BOX_ON_TARGET, BOX), code)
    code = xp.where(walls > 0, WALL, code)
    return code.astype(xp.int32)


class SokobanEnv(JaxEnv):
    """Sokoban (see the module docstring for rules, rewards, symbols and generation).

    Args:
      tokenizer: a ``TextTokenizer``; None = the embedded tokenizer.
      room_size: ``(H, W)`` including the outer walls (RAGEN ``dim_room``, default (6, 6)).
      num_boxes: boxes (= targets) per level (default 1).
      max_turns: turns per episode (default 5).
      max_actions_per_turn: actions per answer (default 3).
      max_actions_per_episode: action cap (default 10).
      format_penalty: reward of an invalid turn (default -0.1).
      step_penalty / box_on_reward / box_off_penalty / finish_reward: gym-sokoban's rewards
        (-0.1, 1.0, -1.0, 10.0).
      reverse_steps: reverse-play steps in generation (default 4 * H * W).
      pull_prob: probability of pulling a box when one is behind the player in reverse play.
      min_solution_len / max_solution_len: accepted optimal lengths (defaults 1 and the action cap).
      solver_max_states: BFS state cap of :meth:`solve` (returns None beyond it).
      max_generation_attempts: redraws before :meth:`generate_task` raises.

    Shapes: ``state.walls/targets/boxes`` int8[H, W]; ``Timestep.obs_tokens`` int32[max_obs_len].
    """

    name = "sokoban"
    action_names = ACTIONS

    def __init__(
        self,
        tokenizer: TextTokenizer | None = None,
        *,
        room_size: Sequence[int] = (6, 6),
        num_boxes: int = 1,
        max_turns: int = 5,
        max_actions_per_turn: int = 3,
        max_actions_per_episode: int = 10,
        format_penalty: float = -0.1,
        step_penalty: float = -0.1,
        box_on_reward: float = 1.0,
        box_off_penalty: float = -1.0,
        finish_reward: float = 10.0,
        reverse_steps: int | None = None,
        pull_prob: float = 0.8,
        min_solution_len: int = 1,
        max_solution_len: int | None = None,
        solver_max_states: int = 200_000,
        max_generation_attempts: int = 2000,
    ):
        super().__init__(
            tokenizer,
            max_turns=max_turns,
            max_actions_per_turn=max_actions_per_turn,
            max_actions_per_episode=max_actions_per_episode,
            format_penalty=format_penalty,
        )
        self.room_size = (int(room_size[0]), int(room_size[1]))
        if min(self.room_size) < 3:
            raise ValueError(f"room_size must be at least 3x3, got {self.room_size}")
        self.num_boxes = int(num_boxes)
        if self.num_boxes < 1 or self.num_boxes + 1 > (self.room_size[0] - 2) * (
            self.room_size[1] - 2
        ):
            raise ValueError(f"num_boxes={num_boxes} does not fit a {self.room_size} room")
        self.step_penalty = float(step_penalty)
        self.box_on_reward = float(box_on_reward)
        self.box_off_penalty = float(box_off_penalty)
        self.finish_reward = float(finish_reward)
        h, w = self.room_size
        self.reverse_steps = int(reverse_steps if reverse_steps is not None else 4 * h * w)
        self.pull_prob = float(pull_prob)
        self.min_solution_len = int(min_solution_len)
        self.max_solution_len = int(
            max_solution_len if max_solution_len is not None else self.max_actions_per_episode
        )
        self.solver_max_states = int(solver_max_states)
        self.max_generation_attempts = int(max_generation_attempts)
        self.renderer = GridRenderer(self.tokenizer, SYMBOLS, h, w, HEADER)

    # --- static info ---------------------------------------------------------------------------

    @property
    def max_obs_len(self) -> int:
        return self.renderer.max_len

    def system_prompt(self) -> str:
        """Rules, symbols and the answer format (every word is in the embedded vocabulary)."""
        return (
            "You are playing Sokoban. You are the player in a room with walls, boxes and targets. "
            "Push every box onto a target to solve the puzzle.\n"
            "Symbols: # is a wall, _ is floor, O is a target, X is a box, √ is a box on a target, "
            "P is the player, S is the player on a target.\n"
            "Actions: Up, Down, Left, Right. Moving into a box pushes it one cell if the cell "
            "behind it is free. You cannot pull a box, push two boxes, or move through a wall.\n"
            "Rewards: -0.1 for each action, +1 for a box onto a target, -1 for a box off a "
            "target, +10 when all boxes are on targets.\n"
            f"You can give up to {self.max_actions_per_turn} actions per turn and "
            f"{self.max_actions_per_episode} actions in total.\n"
            "Answer format: <think> your reasoning </think><answer> actions separated by || "
            "</answer>, for example <answer>Right || Right || Up</answer>"
        )

    # --- device API ----------------------------------------------------------------------------

    def reset(self, key: jax.Array, task: SokobanTask) -> tuple[SokobanState, Timestep]:
        """Starts an episode on ``task`` (``key`` is unused: Sokoban is deterministic)."""
        del key
        boxes = jnp.asarray(task.boxes, jnp.int8)
        targets = jnp.asarray(task.targets, jnp.int8)
        solved = jnp.sum(boxes * targets) == jnp.sum(boxes)
        state = SokobanState(
            walls=jnp.asarray(task.walls, jnp.int8),
            targets=targets,
            boxes=boxes,
            player=jnp.asarray(task.player, jnp.int32),
            num_actions=jnp.zeros((), jnp.int32),
            turn=jnp.zeros((), jnp.int32),
            done=solved,
            success=solved,
        )
        return state, self.make_timestep(state, self.observation(state))

    def step(self, state: SokobanState, parsed: ParsedActions) -> tuple[SokobanState, Timestep]:
        """Runs one turn (see :meth:`JaxEnv.run_turn`) and renders the new observation."""
        state, reward, invalid = self.run_turn(state, parsed, self.apply_action)
        return state, self.make_timestep(state, self.observation(state), reward, invalid)

    def observation(self, state: SokobanState) -> tuple[jax.Array, jax.Array]:
        """(int32[max_obs_len] token ids, int32[] length) of :meth:`render_text`."""
        codes = cell_codes(state.walls, state.targets, state.boxes, state.player)
        return self.renderer.tokens(codes)

    def apply_action(self, state: SokobanState, action: jax.Array):
        """One gym-sokoban action -> ``(state, reward, terminal, success)`` (pure, unbatched)."""
        h, w = self.room_size
        delta = jnp.asarray(DELTAS)[action]
        p = state.player
        n1, n2 = p + delta, p + 2 * delta

        def inside(q):
            return (q[0] >= 0) & (q[0] < h) & (q[1] >= 0) & (q[1] < w)

        def clip(q):
            return jnp.clip(q[0], 0, h - 1), jnp.clip(q[1], 0, w - 1)

        c1, c2 = clip(n1), clip(n2)
        wall1 = ~inside(n1) | (state.walls[c1] > 0)
        box1 = inside(n1) & (state.boxes[c1] > 0)
        free2 = inside(n2) & (state.walls[c2] == 0) & (state.boxes[c2] == 0)
        push = box1 & free2
        moved = push | (~wall1 & ~box1)
        pushed = state.boxes.at[c1].set(0).at[c2].set(1)
        boxes = jnp.where(push, pushed, state.boxes)
        before = jnp.sum(state.boxes * state.targets)
        after = jnp.sum(boxes * state.targets)
        solved = after == jnp.sum(boxes)
        reward = (
            self.step_penalty
            + jnp.where(after > before, self.box_on_reward, 0.0)
            + jnp.where(after < before, self.box_off_penalty, 0.0)
            + jnp.where(solved, self.finish_reward, 0.0)
        )
        new = state.replace(boxes=boxes, player=jnp.where(moved, n1, p).astype(jnp.int32))
        return new, reward.astype(jnp.float32), solved, solved

    # --- host API ------------------------------------------------------------------------------

    def render_text(self, state: SokobanState | SokobanTask) -> str:
        """Observation text of one unbatched state (or task)."""
        codes = cell_codes(
            np.asarray(state.walls),
            np.asarray(state.targets),
            np.asarray(state.boxes),
            np.asarray(state.player),
            xp=np,
        )
        return self.renderer.text(codes)

    def solve(self, task: SokobanTask, max_states: int | None = None) -> list[int] | None:
        """Optimal action list by breadth-first search over (player, boxes) states.

        Every action (moves and pushes alike) costs one step, so BFS in actions is optimal for the
        step count; no deadlock pruning is needed for optimality. Returns None when the level is
        unsolvable or more than ``max_states`` (default ``solver_max_states``) states were expanded.
        An already solved level gives ``[]``.
        """
        cap = self.solver_max_states if max_states is None else int(max_states)
        walls = np.asarray(task.walls) > 0
        h, w = walls.shape
        targets = frozenset(int(i) for i in np.flatnonzero(np.asarray(task.targets).ravel()))
        boxes0 = tuple(sorted(int(i) for i in np.flatnonzero(np.asarray(task.boxes).ravel())))
        p0 = int(task.player[0]) * w + int(task.player[1])
        free = ~walls.ravel()

        def solved(bx):
            return all(b in targets for b in bx)

        def neighbour(i, k):
            r, c = divmod(i, w)
            r, c = r + int(DELTAS[k, 0]), c + int(DELTAS[k, 1])
            return r * w + c if 0 <= r < h and 0 <= c < w else -1

        start = (p0, boxes0)
        if solved(boxes0):
            return []
        parent: dict = {start: None}
        queue = deque([start])
        while queue:
            state = queue.popleft()
            p, bx = state
            box_set = set(bx)
            for k in range(4):
                n1 = neighbour(p, k)
                if n1 < 0 or not free[n1]:
                    continue
                if n1 in box_set:
                    n2 = neighbour(n1, k)
                    if n2 < 0 or not free[n2] or n2 in box_set:
                        continue
                    nb = tuple(sorted((box_set - {n1}) | {n2}))
                else:
                    nb = bx
                nxt = (n1, nb)
                if nxt in parent:
                    continue
                parent[nxt] = (state, k)
                if solved(nb):
                    path = []
                    node = nxt
                    while parent[node] is not None:
                        node, a = parent[node]
                        path.append(a)
                    return path[::-1]
                if len(parent) > cap:
                    return None
                queue.append(nxt)
        return None

    def _room(self, rng: np.random.Generator) -> np.ndarray:
        """bool[H, W] floor mask: a random walk with direction changes carving small blocks."""
        h, w = self.room_size
        floor = np.zeros((h, w), bool)
        r, c = int(rng.integers(1, h - 1)), int(rng.integers(1, w - 1))
        direction = int(rng.integers(4))
        shapes = (((0, 0),), ((0, 0), (0, 1)), ((0, 0), (1, 0)), ((0, 0), (0, 1), (1, 0), (1, 1)))
        for _ in range(max(4, (h - 2) * (w - 2))):
            if rng.random() < 0.35:
                direction = int(rng.integers(4))
            dr, dc = DELTAS[direction]
            r, c = int(np.clip(r + dr, 1, h - 2)), int(np.clip(c + dc, 1, w - 2))
            floor[r, c] = True
            for br, bc in shapes[int(rng.integers(len(shapes)))]:  # a cell, a pair, or 2x2
                floor[min(r + br, h - 2), min(c + bc, w - 2)] = True
        return floor

    def generate_task(self, rng: np.random.Generator) -> SokobanTask:
        """A random solvable level (see the module docstring); deterministic given ``rng``."""
        h, w = self.room_size
        for _ in range(self.max_generation_attempts):
            floor = self._room(rng)
            cells = np.flatnonzero(floor.ravel())
            if len(cells) < self.num_boxes + 2:
                continue
            chosen = rng.choice(cells, size=self.num_boxes + 1, replace=False)
            targets = np.zeros(h * w, np.int8)
            targets[chosen[:-1]] = 1
            boxes = targets.copy()
            p = int(chosen[-1])
            flat_floor = floor.ravel()
            for _ in range(self.reverse_steps):
                k = int(rng.integers(4))
                r, c = divmod(p, w)
                nr, nc = r + int(DELTAS[k, 0]), c + int(DELTAS[k, 1])
                n = nr * w + nc
                if not (0 <= nr < h and 0 <= nc < w) or not flat_floor[n] or boxes[n]:
                    continue
                br, bc = r - int(DELTAS[k, 0]), c - int(DELTAS[k, 1])
                b = br * w + bc
                if 0 <= br < h and 0 <= bc < w and boxes[b] and rng.random() < self.pull_prob:
                    boxes[b], boxes[p] = 0, 1  # pull: the box follows the player
                p = n
            if np.all(boxes[targets > 0] > 0):
                continue  # already solved
            task = SokobanTask(
                walls=(~floor).astype(np.int8),
                targets=targets.reshape(h, w),
                boxes=boxes.reshape(h, w),
                player=np.array(divmod(p, w), np.int32),
                optimal_len=np.array(-1, np.int32),
            )
            sol = self.solve(task)
            if sol is None or not self.min_solution_len <= len(sol) <= self.max_solution_len:
                continue
            return task.replace(optimal_len=np.array(len(sol), np.int32))
        raise RuntimeError(
            f"no level found in {self.max_generation_attempts} attempts for room {self.room_size}, "
            f"{self.num_boxes} boxes, solution length in "
            f"[{self.min_solution_len}, {self.max_solution_len}]"
        )


ENV_CLASS = SokobanEnv
