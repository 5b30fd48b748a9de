"""Demonstrations of the host WebShop env: an expert that replans from any page, and episodes in the
token layout of :func:`actfocus_jax.rollout.engine.rollout_host`.

The counterpart of :class:`actfocus_jax.data.demos.DemoGenerator` for ``WebShopEnv`` (a Python env,
one action per turn by default). Every turn :class:`WebShopExpert` picks the reference action *from
the current page* (so it recovers from a noisy action):

* search page: ``search[<the instruction's keywords>]`` (the query of ``env.solve``: the
  instruction before its price clause, or the product's title when that query misses it; unlike
  ``solve``, whatever the action cap);
* results: ``click[<target asin>]`` when the target is on the page, else ``click[next >]`` /
  ``click[< prev]`` toward it, else ``click[back to search]``;
* item page: ``click[< prev]`` on a wrong item; on the target, ``click[<value>]`` for the first goal
  option not yet selected, then ``click[buy now]``;
* description / features: ``click[< prev]``.

With probability ``epsilon`` a turn's action is replaced by a different available action (never
``buy now`` and never a search: a noisy purchase or query would end or reset the episode rather
than teach a recovery). The response is ``<think> {reasoning} </think><answer>{action}</answer>``
(:func:`actfocus_jax.data.reasoning.format_response`, as for the JAX envs; the episode is assembled
by :class:`actfocus_jax.data.demos.EpisodeBuilder`); ``reasoning="state"`` describes the page only (page, item, selected options: the
decision is made in the answer), ``"plan"`` adds why the answer's action is taken. The env is
stepped with the response's own token ids, exactly as in a rollout, and the parsed action is
checked against the intended one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actfocus_jax.data.reasoning import REASONING_STYLES, format_response
from actfocus_jax.envs.webshop.env import BACK, BUY, NEXT, PREV, canonical, parse_action
from actfocus_jax.rollout.engine import TurnTemplate, make_turn_template, system_prompt_for

__all__ = ["WebShopDemoGenerator", "WebShopExpert"]


def _click(x: str) -> str:
    return f"click[{x}]"


class WebShopExpert:
    """The reference action and its reasoning on any page of a :class:`WebShopEnv` episode."""

    def __init__(self, env: Any, style: str = "plan"):
        if style not in REASONING_STYLES:
            raise ValueError(f"reasoning style must be one of {REASONING_STYLES}, got {style!r}")
        self.env = env
        self.style = style
        self._queries: dict[int, str] = {}

    def query(self, goal_index: int) -> str:
        """The search query of ``env.solve`` (``env.target_searches``: the instruction's keywords,
        or the product's title when those miss it; raises RuntimeError if both miss it). Unlike
        ``solve`` it ignores the action budget, so a demo under a small cap still shows the right
        first actions."""
        if goal_index not in self._queries:
            goal = self.env.goal(goal_index)
            found = next(self.env.target_searches(goal), None)
            if found is None:
                raise RuntimeError(f"no search query finds the goal product {goal.asin}")
            self._queries[goal_index] = found[0]
        return self._queries[goal_index]

    def _wanted_options(self, state: Any) -> list[str]:
        """Goal option values of the open (target) item not selected yet, in the goal's order
        (those ``env.solve`` clicks)."""
        selected = dict(state.selected)
        return [
            value
            for value, names in self.env.goal_options(self.env.goal(state.goal_index))
            if all(selected.get(n) != value for n in names)
        ]

    def action(self, state: Any) -> str:
        env = self.env
        goal = env.goal(state.goal_index)
        if state.page == "search":
            return f"search[{self.query(state.goal_index)}]"
        if state.page == "results":
            if goal.asin in env._page_results(state):
                return _click(goal.asin)
            if goal.asin in state.results:
                target_page = state.results.index(goal.asin) // env.results_per_page
                return _click(NEXT if target_page > state.results_page else PREV)
            return _click(BACK)
        if state.page == "item":
            if state.asin != goal.asin:
                return _click(PREV)
            wanted = self._wanted_options(state)
            return _click(wanted[0]) if wanted else _click(BUY)
        return _click(PREV)  # description / features

    def random_action(self, state: Any, avoid: str, rng: np.random.Generator) -> str | None:
        """A different available action (not ``buy now``, not a search), or None if there is none."""
        options = [
            a
            for a in self.env.available_actions(state)
            if a != avoid and a != _click(BUY) and not a.startswith("search[")
        ]
        return None if not options else options[int(rng.integers(len(options)))]

    def state_text(self, state: Any) -> str:
        env = self.env
        if state.page == "search":
            return "search page ."
        if state.page == "results":
            return f"results page {state.results_page + 1} of {env._num_pages(state)} ."
        if state.page == "item":
            product = env.catalog.product(state.asin)
            selected = dict(state.selected)
            parts = [f"item {state.asin} ."]
            parts += [f"{name} : {selected.get(name, 'none')} ." for name, _ in product.options]
            return " ".join(parts)
        return f"{state.page} page ."

    def reasoning(self, state: Any, action: str, planned: bool) -> str:
        """State style: :meth:`state_text`; plan style: plus why ``action`` is taken (``planned``:
        it is the expert's action, else a noisy one)."""
        text = self.state_text(state)
        if self.style == "state":
            return text
        kind, arg = parse_action(action)
        if not planned:
            why = f"i try {arg} ."
        elif kind == "search":
            why = "i search for the product ."
        elif arg == NEXT:
            why = "the product is on the next page ."
        elif arg == PREV:
            why = "this is not the product , i go back ." if state.page == "item" else "i go back ."
            if state.page == "results":
                why = "the product is on the page before ."
        elif arg == BACK:
            why = "the product is not in the results , i go back to search ."
        elif arg == BUY:
            why = "all options are right , i buy it ."
        elif state.page == "results":
            why = f"{arg} is the product , i open it ."
        else:
            why = f"i need {arg} ."
        return f"{text} {why}"


class WebShopDemoGenerator:
    """Plays demonstration episodes of a :class:`WebShopEnv` (same interface as
    :class:`actfocus_jax.data.demos.DemoGenerator`: ``episode(task, task_id, env_key, rng,
    epsilon)``, with ``task`` a goal index).

    Args:
      env: the WebShop env (its tokenizer encodes observations and responses).
      epsilon: probability that a turn's action is replaced by a different available one.
      template: the rollout token template; default ``make_turn_template(env.tokenizer,
        system_prompt_for(env, prompt), "plain")``.
      prompt: prompt style when ``template`` is None.
      reasoning: ``"plan"`` or ``"state"`` (see :class:`WebShopExpert`).
    """

    def __init__(
        self,
        env: Any,
        *,
        epsilon: float = 0.1,
        template: TurnTemplate | None = None,
        prompt: str = "full",
        reasoning: str = "plan",
    ):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if not getattr(env, "is_host_env", False):
            raise ValueError(
                f"{env!r} is not a host env; use actfocus_jax.data.demos.DemoGenerator"
            )
        self.env = env
        self.epsilon = float(epsilon)
        self.tokenizer = env.tokenizer
        self.template = template or make_turn_template(
            env.tokenizer, system_prompt_for(env, prompt), "plain"
        )
        self.expert = WebShopExpert(env, reasoning)
        self._unk = env.tokenizer.token_to_id("<unk>")

    def episode(
        self,
        task: Any,
        task_id: int,
        env_key: np.ndarray,
        rng: np.random.Generator,
        epsilon: float | None = None,
    ) -> Any:
        """One episode of goal ``task`` (it ends unsolved when the action cap is too small); None if
        no search finds the goal product. ``env_key`` is recorded only (the env is
        deterministic)."""
        from actfocus_jax.data.demos import EpisodeBuilder

        env = self.env
        epsilon = self.epsilon if epsilon is None else float(epsilon)
        goal_index = int(np.asarray(task))
        try:
            self.expert.query(goal_index)
        except RuntimeError:
            return None
        state, ts = env.reset(goal_index)
        ep = EpisodeBuilder(self.template)
        ep.observation(ts.obs_tokens, 0)
        noisy = False
        for turn in range(env.max_turns):
            seen = ts.obs_text
            action = self.expert.action(state)
            planned = True
            if rng.random() < epsilon:
                other = self.expert.random_action(state, action, rng)
                if other is not None:
                    action, planned, noisy = other, False, True
            text = format_response(
                self.expert.reasoning(state, action, planned), [action], self.tokenizer.tags
            )
            ids = self.tokenizer.encode(text)
            if self._unk is not None and self._unk in ids:
                raise RuntimeError(
                    f"webshop demo response has words outside the tokenizer's vocabulary: {text!r}"
                )
            state, ts = env.step(state, ids)
            if ts.invalid_action or [canonical(a) for a in ts.info["actions"]] != [
                canonical(action)
            ]:
                raise RuntimeError(
                    f"webshop demo response does not parse back to its action {action!r} "
                    f"(parsed {ts.info['actions']}, invalid {ts.invalid_action}): {text!r}"
                )
            ep.response(text, ids, turn, seen=seen, actions=[action], reward=float(ts.reward))
            if ts.done:
                break
            if turn + 1 < env.max_turns:
                ep.observation(ts.obs_tokens, turn + 1)
        return ep.finish(
            task_id=task_id,
            env_key=env_key,
            success=ts.success,
            num_actions=state.num_actions,
            noisy=noisy,
        )
