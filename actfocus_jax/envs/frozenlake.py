"""FrozenLake in pure JAX (gym ``FrozenLake-v1`` rules, RAGEN's conventions).

Rules (gym / gymnasium ``toy_text/frozen_lake.py``): the player walks on a square lake of frozen
tiles, holes and one goal. Actions in gym's order: ``0 Left, 1 Down, 2 Right, 3 Up``. A move into the
border leaves the player in place. Stepping into a hole ends the episode (no success, reward 0);
reaching the goal ends it with reward 1 and ``success``. Slippery mode (gym's ``is_slippery=True``,
the default here as in RAGEN): the executed direction is the intended one with probability 1/3 and
each of the two perpendicular ones with probability 1/3, i.e. uniformly one of
``[(a - 1) % 4, a, (a + 1) % 4]`` as in gym's transition table. The draw uses a PRNG key carried in the
state (:func:`slip_action`: one split per executed action), so episodes are reproducible from the key
given to ``reset`` and a batch under ``vmap`` gets independent draws per key. ``slippery=False`` gives
the deterministic lake.

Rewards: 1 on reaching the goal, 0 otherwise (gym's default ``reward_schedule``). Invalid or
unparsable answers: ``format_penalty`` (-0.1) and no move (shared turn semantics of
:mod:`actfocus_jax.envs.base`).

Limits (RAGEN-like, configurable): at most 10 actions per episode (``max_actions_per_episode``),
``max_turns=5``, ``max_actions_per_turn=3`` (5 turns x 3 actions leave slack over the 10-action cap
for turns lost to format errors).

Symbols (RAGEN's ``grid_lookup``): ``P`` player, ``_`` frozen, ``O`` hole, ``G`` goal, ``X`` player in
a hole, ``√`` player on the goal. The start tile is frozen and drawn as ``_`` once the player has
left it. Observation text: ``"State:\\n"`` then the grid, cells separated by spaces, rows by newlines
(:class:`~actfocus_jax.envs.base.GridRenderer`).

Map generation (:meth:`FrozenLakeEnv.generate_task`, host, NumPy; our own implementation of gym's
``generate_random_map`` recipe): every tile is frozen with probability ``p_frozen`` (0.8) and a hole
otherwise; start and goal are two distinct uniformly drawn cells (RAGEN draws both at random;
``random_start_goal=False`` gives gym's corners (0, 0) and (n-1, n-1)) and are frozen; the map is
redrawn until a breadth-first search finds a (non-slippery) path from start to goal no longer than
``max_solution_len`` (default: the per-episode action cap). :meth:`FrozenLakeEnv.solve` returns such a
shortest path (BFS, non-slippery).
"""

from __future__ import annotations

from collections import deque

import chex
import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.envs.base import GridRenderer, JaxEnv, ParsedActions, Timestep
from actfocus_jax.text.tokenizer import TextTokenizer

__all__ = [
    "ACTIONS",
    "DELTAS",
    "SYMBOLS",
    "FrozenLakeEnv",
    "FrozenLakeState",
    "FrozenLakeTask",
    "cell_codes",
    "parse_map",
    "shortest_path",
    "slip_action",
]

#: Gym's action order.
ACTIONS = ("Left", "Down", "Right", "Up")
LEFT, DOWN, RIGHT, UP = range(4)
#: (row, col) displacement of each action.
DELTAS = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], np.int32)
#: Symbol of each cell code (RAGEN's ``grid_lookup`` numbering).
SYMBOLS = ("P", "_", "O", "G", "X", "√")
PLAYER, FROZEN, HOLE, GOAL, PLAYER_IN_HOLE, PLAYER_ON_GOAL = range(6)
HEADER = "State:\n"


@chex.dataclass
class FrozenLakeTask:
    """A map (NumPy arrays; stack along a leading axis for a batch).

    Attributes:
      holes: int8[n, n] 1 = hole.
      start: int32[2] (row, col) of the start tile.
      goal: int32[2] (row, col) of the goal tile.
      optimal_len: int32[] shortest non-slippery path length (-1 if unknown).
    """

    holes: np.ndarray
    start: np.ndarray
    goal: np.ndarray
    optimal_len: np.ndarray


@chex.dataclass
class FrozenLakeState:
    """Env state (arrays; a leading batch axis under ``vmap``).

    Attributes:
      holes: int8[n, n]; goal: int32[2]; player: int32[2].
      key: uint32[2] raw PRNG key of the slip draws (advanced once per executed action).
      num_actions: int32[]; turn: int32[]; done: bool[]; success: bool[].
    """

    holes: jax.Array
    goal: jax.Array
    player: jax.Array
    key: jax.Array
    num_actions: jax.Array
    turn: jax.Array
    done: jax.Array
    success: jax.Array


def slip_action(key: jax.Array, action: jax.Array, slippery: bool = True):
    """Gym's slip: ``(next_key, executed_action int32[])`` for the intended ``action`` int32[].

    ``key`` is split into ``(next_key, sub)``; ``sub`` draws ``u`` uniform in {0, 1, 2} and the executed
    action is ``(action + u - 1) % 4`` (intended with prob. 1/3, each perpendicular one 1/3). With
    ``slippery=False`` the key is still advanced and the executed action is ``action``.
    """
    next_key, sub = jax.random.split(key)
    u = jax.random.randint(sub, (), 0, 3)
    executed = jnp.mod(action + u - 1, 4) if slippery else action
    return next_key, jnp.asarray(executed, jnp.int32)


def cell_codes(holes, goal, player, xp=jnp):
    """int32[n, n] symbol codes (indices into :data:`SYMBOLS`); ``xp`` is jnp or np."""
    h, w = holes.shape
    rr, cc = xp.arange(h)[:, None], xp.arange(w)[None, :]
    is_p = (rr == player[0]) & (cc == player[1])
    is_g = (rr == goal[0]) & (cc == goal[1])
    hole = holes > 0
    code = xp.where(hole, HOLE, xp.where(is_g, GOAL, FROZEN))
    code = xp.where(
        is_p, xp.where(hole, PLAYER_IN_HOLE, xp.where(is_g, PLAYER_ON_GOAL, PLAYER)), code
    )
    return code.astype(xp.int32)


def shortest_path(holes: np.ndarray, start, goal) -> list[int] | None:
    """Shortest non-slippery action list from ``start`` to ``goal`` avoiding holes (BFS), or None.

    Border moves are useless for a shortest path and are not expanded. ``start == goal`` gives ``[]``.
    Neighbours are expanded in action order, so the result is deterministic.
    """
    holes = np.asarray(holes) > 0
    n_r, n_c = holes.shape
    s, g = (int(start[0]), int(start[1])), (int(goal[0]), int(goal[1]))
    if s == g:
        return []
    parent: dict = {s: None}
    queue = deque([s])
    while queue:
        cell = queue.popleft()
        for a in range(4):
            r, c = cell[0] + int(DELTAS[a, 0]), cell[1] + int(DELTAS[a, 1])
            if not (0 <= r < n_r and 0 <= c < n_c) or holes[r, c] or (r, c) in parent:
                continue
            parent[(r, c)] = (cell, a)
            if (r, c) == g:
                path, node = [], (r, c)
                while parent[node] is not None:
                    node, act = parent[node]
                    path.append(act)
                return path[::-1]
            queue.append((r, c))
    return None


def parse_map(text: str) -> FrozenLakeTask:
    """Builds a task from gym letters (``S F H G``) or the env's symbols, one row per line.

    Examples: ``"SFFF\\nFHFH\\nFFFH\\nHFFG"`` (gym's 4x4 map) or ``"P _ _\\n_ O _\\n_ _ G"``.
    ``optimal_len`` is computed by BFS (-1 when unreachable).
    """
    rows = [
        line.split() if " " in line.strip() else list(line.strip()) for line in text.split("\n")
    ]
    rows = [r for r in rows if r]
    n_r, n_c = len(rows), max(len(r) for r in rows)
    holes = np.zeros((n_r, n_c), np.int8)
    start = goal = None
    for r, row in enumerate(rows):
        for c, s in enumerate(row):
            if s in ("S", "P"):
                start = (r, c)
            elif s in ("G", "√"):
                goal = (r, c)
                if s == "√":
                    start = (r, c)
            elif s in ("H", "O", "X"):
                holes[r, c] = 1
                if s == "X":
                    start = (r, c)
            elif s not in ("F", "_"):
                raise ValueError(f"unknown map symbol {s!r} at ({r}, {c})")
    if start is None or goal is None:
        raise ValueError("map needs a start (S or P) and a goal (G)")
    path = shortest_path(holes, start, goal)
    return FrozenLakeTask(
        holes=holes,
        start=np.array(start, np.int32),
        goal=np.array(goal, np.int32),
        optimal_len=np.array(-1 if path is None else len(path), np.int32),
    )


class FrozenLakeEnv(JaxEnv):
    """FrozenLake (see the module docstring for rules, rewards, symbols and generation).

    Args:
      tokenizer: a ``TextTokenizer``; None = the embedded tokenizer.
      size: side ``n`` of the square lake (default 4).
      p_frozen: probability that a tile is frozen in generation (default 0.8, gym / RAGEN ``p``).
      slippery: gym's ``is_slippery`` (default True, as RAGEN).
      random_start_goal: draw start and goal at random (default, RAGEN) or use gym's corners.
      max_turns: turns per episode (default 5).
      max_actions_per_turn: actions per answer (default 3).
      max_actions_per_episode: action cap (default 10).
      format_penalty: reward of an invalid turn (default -0.1).
      goal_reward: reward on reaching the goal (default 1.0).
      min_solution_len / max_solution_len: accepted shortest-path lengths in generation (defaults 1
        and the action cap).
      max_generation_attempts: redraws before :meth:`generate_task` raises.

    Shapes: ``state.holes`` int8[n, n]; ``Timestep.obs_tokens`` int32[max_obs_len].
    """

    name = "frozenlake"
    action_names = ACTIONS

    def __init__(
        self,
        tokenizer: TextTokenizer | None = None,
        *,
        size: int = 4,
        p_frozen: float = 0.8,
        slippery: bool = True,
        random_start_goal: bool = True,
        max_turns: int = 5,
        max_actions_per_turn: int = 3,
        max_actions_per_episode: int = 10,
        format_penalty: float = -0.1,
        goal_reward: float = 1.0,
        min_solution_len: int = 1,
        max_solution_len: int | None = None,
        max_generation_attempts: int = 10_000,
    ):
        super().__init__(
            tokenizer,
            max_turns=max_turns,
            max_actions_per_turn=max_actions_per_turn,
            max_actions_per_episode=max_actions_per_episode,
            format_penalty=format_penalty,
        )
        self.size = int(size)
        if self.size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if not 0.0 < p_frozen <= 1.0:
            raise ValueError(f"p_frozen must be in (0, 1], got {p_frozen}")
        self.p_frozen = float(p_frozen)
        self.slippery = bool(slippery)
        self.random_start_goal = bool(random_start_goal)
        self.goal_reward = float(goal_reward)
        self.min_solution_len = int(min_solution_len)
        self.max_solution_len = int(
            max_solution_len if max_solution_len is not None else self.max_actions_per_episode
        )
        if self.min_solution_len > self.max_solution_len:
            raise ValueError("min_solution_len > max_solution_len")
        self.max_generation_attempts = int(max_generation_attempts)
        self.renderer = GridRenderer(self.tokenizer, SYMBOLS, self.size, self.size, HEADER)

    # --- static info ---------------------------------------------------------------------------

    @property
    def max_obs_len(self) -> int:
        return self.renderer.max_len

    def system_prompt(self) -> str:
        """Rules, symbols and the answer format (every word is in the embedded vocabulary)."""
        slip = (
            "The ice is slippery: you move in the intended direction only one time in three, "
            "otherwise to one of the two sides.\n"
            if self.slippery
            else "The ice is not slippery: you always move in the intended direction.\n"
        )
        return (
            "You are playing FrozenLake. You walk on a frozen lake with holes. "
            "Reach the goal without falling into a hole.\n"
            "Symbols: P is the player, _ is frozen ice, O is a hole, G is the goal, "
            "X is the player in a hole, √ is the player on the goal.\n"
            "Actions: Left, Down, Right, Up. Moving into the border leaves you in place.\n"
            + slip
            + f"Rewards: +{self.goal_reward:g} when you reach the goal, 0 otherwise. "
            "Falling into a hole ends the game.\n"
            f"You can give up to {self.max_actions_per_turn} actions per turn and "
            f"{self.max_actions_per_episode} actions in total.\n"
            "Answer format: <think> your reasoning </think><answer> actions separated by || "
            "</answer>, for example <answer>Left || Down || Right</answer>"
        )

    # --- device API ----------------------------------------------------------------------------

    def reset(self, key: jax.Array, task: FrozenLakeTask) -> tuple[FrozenLakeState, Timestep]:
        """Starts an episode on ``task``; ``key`` (raw uint32[2] or typed) seeds the slip draws."""
        key = jnp.asarray(key)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        player = jnp.asarray(task.start, jnp.int32)
        goal = jnp.asarray(task.goal, jnp.int32)
        holes = jnp.asarray(task.holes, jnp.int8)
        at_goal = jnp.all(player == goal)
        in_hole = holes[player[0], player[1]] > 0
        state = FrozenLakeState(
            holes=holes,
            goal=goal,
            player=player,
            key=key,
            num_actions=jnp.zeros((), jnp.int32),
            turn=jnp.zeros((), jnp.int32),
            done=at_goal | in_hole,
            success=at_goal,
        )
        return state, self.make_timestep(state, self.observation(state))

    def step(
        self, state: FrozenLakeState, parsed: ParsedActions
    ) -> tuple[FrozenLakeState, Timestep]:
        """Runs one turn (see :meth:`JaxEnv.run_turn`) and renders the new observation."""
        state, reward, invalid = self.run_turn(state, parsed, self.apply_action)
        return state, self.make_timestep(state, self.observation(state), reward, invalid)

    def observation(self, state: FrozenLakeState) -> tuple[jax.Array, jax.Array]:
        """(int32[max_obs_len] token ids, int32[] length) of :meth:`render_text`."""
        return self.renderer.tokens(cell_codes(state.holes, state.goal, state.player))

    def apply_action(self, state: FrozenLakeState, action: jax.Array):
        """One gym action -> ``(state, reward, terminal, success)`` (pure, unbatched)."""
        key, executed = slip_action(state.key, action, self.slippery)
        n = self.size
        moved = state.player + jnp.asarray(DELTAS)[executed]
        player = jnp.clip(moved, 0, n - 1).astype(jnp.int32)
        in_hole = state.holes[player[0], player[1]] > 0
        at_goal = jnp.all(player == state.goal)
        reward = jnp.where(at_goal, self.goal_reward, 0.0).astype(jnp.float32)
        return state.replace(player=player, key=key), reward, in_hole | at_goal, at_goal

    # --- host API ------------------------------------------------------------------------------

    def render_text(self, state: FrozenLakeState | FrozenLakeTask) -> str:
        """Observation text of one unbatched state (or task)."""
        player = state.player if hasattr(state, "player") else state.start
        codes = cell_codes(
            np.asarray(state.holes), np.asarray(state.goal), np.asarray(player), xp=np
        )
        return self.renderer.text(codes)

    def solve(self, task: FrozenLakeTask) -> list[int] | None:
        """Shortest non-slippery path (BFS, :func:`shortest_path`); None if the goal is unreachable."""
        return shortest_path(task.holes, task.start, task.goal)

    def generate_task(self, rng: np.random.Generator) -> FrozenLakeTask:
        """A random solvable map (see the module docstring); deterministic given ``rng``."""
        n = self.size
        for _ in range(self.max_generation_attempts):
            holes = (rng.random((n, n)) >= self.p_frozen).astype(np.int8)
            if self.random_start_goal:
                s, g = rng.choice(n * n, size=2, replace=False)
                start, goal = divmod(int(s), n), divmod(int(g), n)
            else:
                start, goal = (0, 0), (n - 1, n - 1)
            holes[start] = 0
            holes[goal] = 0
            path = shortest_path(holes, start, goal)
            if path is None or not self.min_solution_len <= len(path) <= self.max_solution_len:
                continue
            return FrozenLakeTask(
                holes=holes,
                start=np.array(start, np.int32),
                goal=np.array(goal, np.int32),
                optimal_len=np.array(len(path), np.int32),
            )
        raise RuntimeError(
            f"no map found in {self.max_generation_attempts} attempts for size {n}, "
            f"p_frozen={self.p_frozen}, solution length in "
            f"[{self.min_solution_len}, {self.max_solution_len}]"
        )


ENV_CLASS = FrozenLakeEnv
