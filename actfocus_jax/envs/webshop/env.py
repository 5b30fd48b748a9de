"""WebShop as a host (Python) environment (Yao et al. 2022, text mode; RAGEN's WebShop conventions).

Pages (WebShop's ``web_agent_site`` text env):

* ``search``: the start page; action ``search[<query>]`` runs the BM25 search (:mod:`.search`) and
  shows the results.
* ``results``: ``num_results`` (default 50, as WebShop) hits, ``results_per_page`` (10) per page;
  ``click[next >]`` / ``click[< prev]`` page, ``click[<asin>]`` (or ``click[<title>]``) opens an item,
  ``click[back to search]``.
* ``item``: title, price, options; ``click[<option value>]`` selects that value for its option (a
  later click replaces it), ``click[description]`` / ``click[features]`` open sub-pages,
  ``click[< prev]`` returns to the results, ``click[buy now]`` buys and ends the episode.
* ``description`` / ``features``: ``click[< prev]`` returns to the item; ``click[back to search]``.

``click[back to search]`` works on every page but the search page (a new search starts on page 1;
selected options are forgotten, as WebShop's new session state). ``search[...]`` is only available on
the search page (WebShop's ``has_search_bar``). Every observation ends with the page's available
actions, one per line, in RAGEN's spelling (``search[<content>]``, ``click[...]``).

Action text is matched case- and spacing-insensitively: both sides are reduced to their lowercase
word / punctuation pieces (``"click [ Next > ]"`` == ``"click[next >]"``), so responses decoded from
a word-level tokenizer (which puts spaces around punctuation) parse as the model meant them.

Turn semantics (RAGEN-style; the same as the JAX envs where it applies):

* The response's last ``<answer>...</answer>`` span is split at ``||``; empty pieces are dropped; at
  most ``max_actions_per_turn`` actions are kept (extra actions are ignored and reported in
  ``info["num_dropped_actions"]``). Default ``max_actions_per_turn = 1``: a web action depends on
  the page it was chosen on, so one action per turn (RAGEN's WebShop setting) is the natural default;
  larger values run the actions one after another, each checked against the page it lands on.
* Actions are executed in order. An invalid action (unparsable, or not among the page's available
  actions) gets ``format_penalty`` (default -0.1), makes no move, and is counted
  (``info["invalid_action"]``). A response with no parsable action at all counts as one invalid
  action. Every attempted action, valid or not, counts towards ``max_actions`` (default 9), so an
  episode ends after at most ``max_actions`` turns (``max_turns == max_actions``).
* ``click[buy now]`` ends the episode with WebShop's reward (:mod:`.reward`); actions after it in
  the same answer are ignored. Reaching the action cap without buying ends the episode with task
  reward 0. A turn's reward is the sum of its penalties and the purchase reward.
* Steps on a finished episode are no-ops (reward 0, ``done`` True).

States are immutable (:class:`WebShopState`, a frozen dataclass): ``step`` returns a new state, so
the ``G`` rollouts of a group can start from the same reset state.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from actfocus_jax.envs.webshop.catalog import Catalog, Goal
from actfocus_jax.envs.webshop.reward import RewardInfo, purchase_reward
from actfocus_jax.envs.webshop.search import ProductSearch
from actfocus_jax.text.tokenizer import DEFAULT_TAGS, TextTokenizer, build_embedded_tokenizer

__all__ = [
    "BACK",
    "BUY",
    "NEXT",
    "PREV",
    "WebShopEnv",
    "WebShopState",
    "WebShopTimestep",
    "canonical",
    "parse_action",
    "parse_actions",
]

BACK, NEXT, PREV, BUY = "back to search", "next >", "< prev", "buy now"
DESCRIPTION, FEATURES = "description", "features"
SEARCH_ACTION = "search[<content>]"
_MAX_QUERY_CHARS = 300
_MAX_TITLE_WORDS = 30

_ACTION_RE = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


def canonical(text: str) -> str:
    """Lowercase word / punctuation pieces joined by single spaces (``"Next>"`` -> ``"next >"``)."""
    return " ".join(re.findall(r"\w+|[^\w\s]", str(text).lower()))


def parse_action(text: str) -> tuple[str, str] | None:
    """``"search[red shirt]"`` -> ``("search", "red shirt")``, ``"click [ Buy Now ]"`` ->
    ``("click", "buy now")`` (click targets canonicalised); None when unparsable or empty."""
    m = _ACTION_RE.match(str(text))
    if m is None:
        return None
    kind, arg = m.group(1).lower(), m.group(2).strip()
    if kind == "click":
        arg = canonical(arg)
    else:
        arg = " ".join(arg.split())[:_MAX_QUERY_CHARS]
    if not arg:
        return None
    return kind, arg


def parse_actions(
    text: str, max_actions_per_turn: int = 1, tags: dict[str, str] | None = None
) -> list[str]:
    """Action strings of a response: the last ``<answer>...</answer>`` span split at ``||``.

    Args:
      text: the decoded response (any text; never raises).
      max_actions_per_turn: keep at most this many (non-empty) actions.
      tags: ``{"answer_open", "answer_close", "action_sep"}`` (default :data:`DEFAULT_TAGS`).

    Returns:
      list[str] of stripped, non-empty pieces (not yet validated); ``[]`` without a complete span.
    """
    tags = tags or DEFAULT_TAGS
    text = str(text)
    close = text.rfind(tags["answer_close"])
    if close < 0:
        return []
    opening = text.rfind(tags["answer_open"], 0, close)
    if opening < 0:
        return []
    span = text[opening + len(tags["answer_open"]) : close]
    pieces = [p.strip() for p in span.split(tags["action_sep"])]
    return [p for p in pieces if p][: max(0, int(max_actions_per_turn))]


@dataclasses.dataclass(frozen=True)
class WebShopState:
    """Immutable episode state.

    Attributes:
      goal_index: int, index into ``catalog.goals``.
      page: str, one of "search", "results", "item", "description", "features", "done".
      results: tuple[str, ...], asins of the last search.
      results_page: int, 0-based results page.
      asin: str | None, the open item.
      selected: tuple[tuple[str, str], ...], chosen ``(option name, value)`` on the open item.
      num_actions / num_invalid / turn: int counters (attempted actions, invalid ones, turns).
      done: bool. reward: float, the purchase reward (0 until bought). success: bool (reward == 1).
      bought: str | None, the bought asin. last_invalid: bool, the last action was invalid.
    """

    goal_index: int
    page: str = "search"
    results: tuple[str, ...] = ()
    results_page: int = 0
    asin: str | None = None
    selected: tuple[tuple[str, str], ...] = ()
    num_actions: int = 0
    num_invalid: int = 0
    turn: int = 0
    done: bool = False
    reward: float = 0.0
    success: bool = False
    bought: str | None = None
    last_invalid: bool = False


@dataclasses.dataclass
class WebShopTimestep:
    """Result of ``reset`` / ``step`` (the host counterpart of the JAX envs' ``Timestep``).

    Attributes:
      obs_tokens: list[int], token ids of ``obs_text`` (at most ``env.max_obs_len``).
      obs_text: str, the observation text (the page with its available actions).
      reward: float, this turn's reward (penalties + purchase reward).
      done: bool. success: bool (strict success: purchase reward == 1).
      invalid_action: int, invalid actions in this turn.
      num_actions: int, actions attempted so far in the episode. turn: int, turns so far.
      info: dict with ``success``, ``invalid_action``, ``num_actions``, ``num_invalid_actions``,
        ``purchase_reward``, ``page``, ``actions`` (this turn's action strings),
        ``num_dropped_actions`` and ``reward_info`` (a :class:`RewardInfo` dict after a purchase).
    """

    obs_tokens: list[int]
    obs_text: str
    reward: float
    done: bool
    success: bool
    invalid_action: int
    num_actions: int
    turn: int
    info: dict[str, Any]

    @property
    def observation(self) -> str:
        return self.obs_text


class WebShopEnv:
    """WebShop over a :class:`Catalog` (see the module docstring for pages and turn semantics).

    Args:
      catalog: Catalog (real data via :func:`.catalog.load_catalog` or synthetic).
      tokenizer: TextTokenizer for observation ids and decoding token-id responses; None -> the
        embedded word-level tokenizer.
      max_actions: int, action cap per episode (RAGEN: 9).
      max_actions_per_turn: int, actions per answer (default 1).
      format_penalty: float, reward of each invalid action (default -0.1).
      results_per_page: int (WebShop: 10). num_results: int, hits per search (WebShop: 50).
      max_obs_len: int | None, observation token cap, what the rollout engine pads each
        observation to; None -> 384 for a synthetic catalog (its longest page is about 300 tokens
        with the embedded tokenizer) and 2048 otherwise. A longer observation keeps its first and
        last ``max_obs_len // 2`` tokens (the instruction and the available actions).
    """

    is_host_env = True
    name = "webshop"

    def __init__(
        self,
        catalog: Catalog,
        tokenizer: TextTokenizer | None = None,
        *,
        max_actions: int = 9,
        max_actions_per_turn: int = 1,
        format_penalty: float = -0.1,
        results_per_page: int = 10,
        num_results: int = 50,
        max_obs_len: int | None = None,
    ):
        if max_obs_len is None:
            max_obs_len = 384 if catalog.source.startswith("synthetic") else 2048
        if min(max_actions, max_actions_per_turn, results_per_page, num_results, max_obs_len) < 1:
            raise ValueError(
                "max_actions, max_actions_per_turn, results_per_page, num_results, max_obs_len must be >= 1"
            )
        if not catalog.goals:
            raise ValueError("the catalog has no goals")
        self.catalog = catalog
        self.tokenizer = tokenizer if tokenizer is not None else build_embedded_tokenizer()
        self.max_actions = int(max_actions)
        self.max_actions_per_turn = int(max_actions_per_turn)
        self.format_penalty = float(format_penalty)
        self.results_per_page = int(results_per_page)
        self.num_results = int(num_results)
        self.max_obs_len = int(max_obs_len)
        self.search_engine = ProductSearch(catalog.products)

    # --- configuration ----------------------------------------------------------------------

    @property
    def max_turns(self) -> int:
        """Every turn attempts at least one action, so an episode has at most ``max_actions`` turns."""
        return self.max_actions

    @property
    def max_actions_per_episode(self) -> int:
        return self.max_actions

    def goals(self, split: str = "train") -> tuple[int, ...]:
        """Goal indices of ``split`` ("train" / "test"; disjoint, deterministic)."""
        return self.catalog.split(split)

    def goal(self, goal_index: int) -> Goal:
        return self.catalog.goals[goal_index]

    def system_prompt(self) -> str:
        """The task description given before the first observation."""
        n, k = self.max_actions, self.max_actions_per_turn
        return (
            "you are a shopping agent on webshop. find and buy the product that best matches the "
            "instruction: its attributes, its options and its price. every page lists its "
            "available actions. on the search page use search[your query]. use click[...] to "
            "open a product, to choose an option, or to go to another page, and click[buy now] "
            f"to buy the product. you have at most {n} actions. answer in the format "
            f"<think> your reasoning </think><answer> action </answer> with at most {k} "
            f"action{'s' if k > 1 else ''}" + (", separated by ||." if k > 1 else ".")
        )

    # --- reset / step -------------------------------------------------------------------------

    def reset(
        self,
        goal_index: int | Goal | None = None,
        *,
        seed: int | None = None,
        split: str = "train",
    ) -> tuple[WebShopState, WebShopTimestep]:
        """Starts an episode on the search page.

        Args:
          goal_index: int, the goal (index into ``catalog.goals``; a :class:`Goal` of the catalog is
            accepted too); if None, drawn from ``split`` with ``seed``.
          seed: int seed of that draw (None -> 0).
          split: "train" or "test".
        """
        if goal_index is None:
            pool = self.goals(split)
            if not pool:
                raise ValueError(f"split {split!r} has no goals")
            goal_index = pool[random.Random(seed or 0).randrange(len(pool))]
        if isinstance(goal_index, Goal):
            goal_index = self.catalog.goals.index(goal_index)
        goal_index = int(goal_index)
        if not 0 <= goal_index < len(self.catalog.goals):
            raise IndexError(f"goal_index {goal_index} out of range [0, {len(self.catalog.goals)})")
        state = WebShopState(goal_index=goal_index)
        return state, self._timestep(state, 0.0, 0, [], 0, None)

    def step(
        self, state: WebShopState, response: str | Sequence[str] | Sequence[int] | np.ndarray
    ) -> tuple[WebShopState, WebShopTimestep]:
        """Runs one turn.

        Args:
          state: WebShopState.
          response: the model's response as text, as token ids (decoded with the tokenizer), or an
            already parsed list of action strings (``["click[buy now]"]``).

        Returns:
          (new state, WebShopTimestep).
        """
        if state.done:
            return state, self._timestep(state, 0.0, 0, [], 0, None)
        actions, dropped = self._actions_of(response)
        reward, invalid = 0.0, 0
        reward_info: RewardInfo | None = None
        for action in actions or [None]:
            new, reward_info = self._apply(state, action)
            n_act = state.num_actions + 1
            if new is None:
                invalid += 1
                reward += self.format_penalty
                state = dataclasses.replace(
                    state, num_actions=n_act, num_invalid=state.num_invalid + 1, last_invalid=True
                )
            else:
                state = dataclasses.replace(new, num_actions=n_act, last_invalid=False)
            if state.done:
                reward += state.reward
                break
            if state.num_actions >= self.max_actions:
                state = dataclasses.replace(state, done=True, page="done")
                break
        state = dataclasses.replace(state, turn=state.turn + 1)
        return state, self._timestep(state, reward, invalid, list(actions), dropped, reward_info)

    def _actions_of(self, response) -> tuple[list[str], int]:
        if isinstance(response, np.ndarray):
            response = response.tolist()
        if isinstance(response, str):
            text = response
        elif isinstance(response, Sequence) and all(isinstance(a, str) for a in response):
            acts = [a for a in response if a.strip()]
            k = self.max_actions_per_turn
            return list(acts[:k]), max(0, len(acts) - k)
        else:
            try:
                text = self.tokenizer.decode([int(i) for i in response])
            except Exception:  # garbage ids: no action
                text = ""
        all_acts = parse_actions(text, 10**6, self.tokenizer.tags)
        k = self.max_actions_per_turn
        return all_acts[:k], max(0, len(all_acts) - k)

    # --- page logic ---------------------------------------------------------------------------

    def _page_results(self, state: WebShopState) -> tuple[str, ...]:
        lo = state.results_page * self.results_per_page
        return state.results[lo : lo + self.results_per_page]

    def _num_pages(self, state: WebShopState) -> int:
        return max(1, -(-len(state.results) // self.results_per_page))

    def _clickables(self, state: WebShopState) -> dict[str, tuple[str, Any]]:
        """canonical label -> (effect, argument), in display order; titles accepted, not listed."""
        page = state.page
        out: dict[str, tuple[str, Any]] = {}
        if page in ("results", "item", "description", "features"):
            out[BACK] = ("back", None)
        if page == "results":
            if state.results_page > 0:
                out[PREV] = ("page", state.results_page - 1)
            if state.results_page + 1 < self._num_pages(state):
                out[NEXT] = ("page", state.results_page + 1)
            for asin in self._page_results(state):
                out[canonical(asin)] = ("item", asin)
        elif page == "item":
            product = self.catalog.product(state.asin)
            out[PREV] = ("results", None)
            for name, values in product.options:
                for v in values:
                    out.setdefault(canonical(v), ("option", (name, v)))
            out[DESCRIPTION] = ("sub", DESCRIPTION)
            out[FEATURES] = ("sub", FEATURES)
            out[BUY] = ("buy", None)
        elif page in (DESCRIPTION, FEATURES):
            out[PREV] = ("item", state.asin)
        return out

    def available_actions(self, state: WebShopState) -> list[str]:
        """The page's actions in RAGEN's spelling (``search[<content>]``, ``click[...]``)."""
        if state.done:
            return []
        if state.page == "search":
            return [SEARCH_ACTION]
        labels = []
        for label, (effect, arg) in self._clickables(state).items():
            if effect == "item" and state.page == "results":  # (on sub-pages "< prev" is the label)
                labels.append(arg)
            elif effect == "option":
                labels.append(arg[1])
            else:
                labels.append(label)
        return [f"click[{x}]" for x in labels]

    def _apply(
        self, state: WebShopState, action: str | None
    ) -> tuple[WebShopState | None, RewardInfo | None]:
        """One action; ``(None, None)`` when invalid."""
        parsed = parse_action(action) if action is not None else None
        if parsed is None:
            return None, None
        kind, arg = parsed
        if kind == "search":
            if state.page != "search":
                return None, None
            results = tuple(self.search_engine.search(arg, self.num_results))
            return dataclasses.replace(
                state, page="results", results=results, results_page=0, asin=None, selected=()
            ), None
        clickables = self._clickables(state)
        target = clickables.get(arg)
        if target is None and state.page == "results":
            for asin in self._page_results(state):
                if canonical(self.catalog.product(asin).name) == arg:
                    target = ("item", asin)
        if target is None:
            return None, None
        effect, value = target
        if effect == "back":
            return WebShopState(
                goal_index=state.goal_index,
                num_actions=state.num_actions,
                num_invalid=state.num_invalid,
                turn=state.turn,
            ), None
        if effect == "page":
            return dataclasses.replace(state, results_page=value), None
        if effect == "item":
            if state.page == "results":
                return dataclasses.replace(state, page="item", asin=value, selected=()), None
            return dataclasses.replace(state, page="item"), None
        if effect == "results":
            return dataclasses.replace(state, page="results", asin=None, selected=()), None
        if effect == "sub":
            return dataclasses.replace(state, page=value), None
        if effect == "option":
            name, v = value
            selected = (*tuple((n, x) for n, x in state.selected if n != name), (name, v))
            return dataclasses.replace(state, selected=selected), None
        if effect == "buy":
            product = self.catalog.product(state.asin)
            info = purchase_reward(product, self.goal(state.goal_index), dict(state.selected))
            return dataclasses.replace(
                state,
                page="done",
                done=True,
                reward=info.reward,
                success=info.success,
                bought=state.asin,
            ), info
        return None, None

    # --- rendering ----------------------------------------------------------------------------

    def _short_title(self, title: str) -> str:
        words = title.split()
        return " ".join(words[:_MAX_TITLE_WORDS])

    def render_text(self, state: WebShopState) -> str:
        """The observation text of ``state``'s page, ending with its available actions."""
        goal = self.goal(state.goal_index)
        lines = []
        if state.last_invalid and not state.done:
            lines.append("your last action was invalid.")
        lines.append(f"instruction: {goal.instruction}")
        if state.page == "done":
            if state.bought is not None:
                product = self.catalog.product(state.bought)
                chosen = ", ".join(v for _, v in state.selected) or "none"
                lines.append(f"you bought {state.bought}: {self._short_title(product.name)}")
                lines.append(f"options: {chosen}")
            else:
                lines.append("no actions left. you did not buy a product.")
            lines.append("episode finished.")
            return "\n".join(lines)
        if state.page == "search":
            lines.append("page: search")
        elif state.page == "results":
            n = len(state.results)
            lines.append(
                f"page: results {state.results_page + 1} of {self._num_pages(state)} "
                f"(total results: {n})"
            )
            if n == 0:
                lines.append("no results.")
            for asin in self._page_results(state):
                product = self.catalog.product(asin)
                lines.append(f"{asin}: {self._short_title(product.name)}, {product.price_text}")
        elif state.page == "item":
            product = self.catalog.product(state.asin)
            chosen = dict(state.selected)
            lines.append(f"page: item {product.asin}")
            lines.append(f"title: {self._short_title(product.name)}")
            lines.append(f"price: {product.price_text}")
            for name, values in product.options:
                lines.append(f"{name}: {', '.join(values)} (selected: {chosen.get(name, 'none')})")
        elif state.page == DESCRIPTION:
            product = self.catalog.product(state.asin)
            lines.append(f"page: description of {product.asin}")
            lines.append(product.description or "no description.")
        elif state.page == FEATURES:
            product = self.catalog.product(state.asin)
            lines.append(f"page: features of {product.asin}")
            lines += [f"- {b}" for b in product.bullets] or ["no features."]
        lines.append("available actions:")
        lines += self.available_actions(state)
        return "\n".join(lines)

    def _timestep(
        self,
        state: WebShopState,
        reward: float,
        invalid: int,
        actions: list[str],
        dropped: int,
        reward_info: RewardInfo | None,
    ) -> WebShopTimestep:
        text = self.render_text(state)
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_obs_len:
            half = self.max_obs_len // 2
            ids = ids[:half] + ids[len(ids) - (self.max_obs_len - half) :]
        info = {
            "success": state.success,
            "invalid_action": invalid,
            "num_actions": state.num_actions,
            "num_invalid_actions": state.num_invalid,
            "purchase_reward": state.reward,
            "page": state.page,
            "actions": actions,
            "num_dropped_actions": dropped,
            "reward_info": None if reward_info is None else reward_info.asdict(),
        }
        return WebShopTimestep(
            obs_tokens=ids,
            obs_text=text,
            reward=float(reward),
            done=state.done,
            success=state.success,
            invalid_action=invalid,
            num_actions=state.num_actions,
            turn=state.turn,
            info=info,
        )

    # --- parsing and reference solution -----------------------------------------------------

    def parse_actions(self, response: str | Sequence[int]) -> list[str]:
        """Action strings of a response (text or token ids), at most ``max_actions_per_turn``."""
        return self._actions_of(response)[0]

    @staticmethod
    def format_response(actions: Sequence[str], think: str = "") -> str:
        """``<think> think </think><answer> a1 || a2 </answer>`` (default tags)."""
        t = DEFAULT_TAGS
        body = f" {t['action_sep']} ".join(actions)
        return f"{t['think_open']} {think} {t['think_close']}{t['answer_open']} {body} {t['answer_close']}"

    @staticmethod
    def instruction_query(goal: Goal) -> str:
        """Search keywords of an instruction: the text before the price clause."""
        return goal.instruction.split(", and price")[0].strip()

    def goal_options(self, goal: Goal) -> list[tuple[str, tuple[str, ...]]]:
        """The goal's option values that its product offers, in the goal's order, each with the
        product's option names that list the value (a value the product does not offer, or offers
        under a different name than the goal's, is left out: no click can choose it)."""
        product = self.catalog.product(goal.asin)
        out = []
        for name, value in goal.options:
            names = tuple(n for n, vals in product.options if value in vals)
            if names and (name in names or not name):
                out.append((value, names))
        return out

    def target_searches(self, goal: Goal) -> Iterator[tuple[str, tuple[str, ...]]]:
        """``(query, results)`` of the reference searches whose results contain the goal's
        product, in the order ``solve`` tries them: the instruction's keywords, then the title
        (lazily: the title is searched only if the caller asks for a second one)."""
        for query in (self.instruction_query(goal), self.catalog.product(goal.asin).name):
            results = tuple(self.search_engine.search(query, self.num_results))
            if goal.asin in results:
                yield query, results

    def solve(self, goal: Goal | int) -> list[str]:
        """Reference solution: search the instruction's keywords (or, if the target is not among the
        results within the action budget, its title), page to the target, click it, choose the goal
        options, buy. Reward 1 on the synthetic catalog.

        Returns:
          list[str] of actions, one per turn.

        Raises:
          RuntimeError: the target cannot be reached within ``max_actions`` actions.
        """
        if isinstance(goal, int):
            goal = self.goal(goal)
        option_actions = [f"click[{value}]" for value, _ in self.goal_options(goal)]
        for query, results in self.target_searches(goal):
            page = results.index(goal.asin) // self.results_per_page
            actions = [f"search[{query}]"] + ["click[next >]"] * page
            actions += [f"click[{goal.asin}]", *option_actions, "click[buy now]"]
            if len(actions) <= self.max_actions:
                return actions
        raise RuntimeError(
            f"goal product {goal.asin} not reachable within {self.max_actions} actions"
        )
