"""Tests of the WebShop host environment (catalog, loader, BM25 search, pages, reward, parsing)."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actfocus_jax.envs.base import unknown_tokens
from actfocus_jax.envs.webshop import (
    CatalogError,
    Goal,
    Product,
    ProductSearch,
    WebShopEnv,
    load_catalog,
    make,
    parse_actions,
    purchase_reward,
    synthetic_catalog,
)
from actfocus_jax.envs.webshop.reward import fuzzy_ratio, title_terms, token_set_ratio, type_reward
from actfocus_jax.envs.webshop.synthetic import (
    ATTRIBUTES,
    MAX_PRODUCTS,
    OPTION_VALUES,
    synthetic_vocabulary,
)
from actfocus_jax.text import build_embedded_tokenizer

TOKENIZER = build_embedded_tokenizer()


@pytest.fixture(scope="module")
def env() -> WebShopEnv:
    return make(seed=0, num_products=200, num_goals=400, tokenizer=TOKENIZER)


def _product(**kw) -> Product:
    base = dict(
        asin="p1",
        name="nova organic coffee",
        category="food",
        query="coffee",
        product_category="food › beverages › coffee",
        price=20.0,
        attributes=("gluten free", "organic"),
        options=(("flavor", ("honey", "caramel")), ("size", ("6 pack", "12 pack"))),
        bullets=("organic for everyday use",),
        description="the nova coffee is gluten free and organic.",
    )
    base.update(kw)
    return Product(**base)


def _goal(**kw) -> Goal:
    base = dict(
        instruction="i need organic coffee",
        asin="p1",
        name="nova organic coffee",
        category="food",
        query="coffee",
        product_category="food › beverages › coffee",
        attributes=("gluten free", "organic"),
        options=(("flavor", "honey"), ("size", "12 pack")),
        price_upper=30.0,
    )
    base.update(kw)
    return Goal(**base)


# ------------------------------------------------------------------------------------------------
# Reward


def test_fuzzy_ratios_match_thefuzz_examples():
    # thefuzz README: ratio("this is a test", "this is a test!") == 97; token_set_ratio of
    # "fuzzy was a bear" vs "fuzzy fuzzy was a bear" == 100 (one token set contains the other).
    assert round(fuzzy_ratio("this is a test", "this is a test!")) == 97
    assert token_set_ratio("fuzzy was a bear", "fuzzy fuzzy was a bear") == 100
    assert token_set_ratio("Gluten-Free", "gluten free") == 100
    assert token_set_ratio("long sleeve", "short sleeve") < 85
    assert token_set_ratio("", "x") == 0


def test_reward_hand_computed():
    p, g = _product(), _goal()
    full = purchase_reward(p, g, {"flavor": "honey", "size": "12 pack"})
    assert full.reward == 1.0 and full.success
    # wrong flavor: (2 attrs + 1 option + price) / (2 + 2 + 1)
    r = purchase_reward(p, g, {"flavor": "caramel", "size": "12 pack"})
    assert r.reward == pytest.approx(4 / 5) and not r.success
    # no option chosen, price too high: 2 / 5
    r = purchase_reward(p, g, {}, price=45.0)
    assert r.reward == pytest.approx(2 / 5) and not r.price_ok
    # attribute found only in the description (substring rule) still counts
    p2 = _product(attributes=("gluten free",), bullets=())
    assert purchase_reward(p2, g, ["honey", "12 pack"]).reward == 1.0
    # attribute absent everywhere: (1 + 2 + 1) / 5
    p3 = _product(attributes=("low carb",), bullets=(), description="the nova coffee is organic.")
    assert purchase_reward(p3, g, ["honey", "12 pack"]).reward == pytest.approx(4 / 5)
    # fuzzy attribute match (token-set ratio > 85)
    p4 = _product(attributes=("Gluten-Free", "Organic"), description="", bullets=())
    assert purchase_reward(p4, g, ["honey", "12 pack"]).num_attribute_matches == 2


def test_type_reward_ladder():
    g = _goal(name="nova coffee beans bag grinder")  # type words: nova coffee beans bag grinder
    other = dict(query="tea", product_category="food › snacks › bars")
    # 1/5 = 0.2 overlap, no query / category match -> 0.5
    t = type_reward(_product(name="acme coffee", **other), g)
    assert t["title_score"] == pytest.approx(0.2) and t["r_type"] == 0.5
    # > 0.2 overlap -> 1
    assert type_reward(_product(name="acme coffee beans", **other), g)["r_type"] == 1.0
    # overlap < 0.1 -> 0.1
    g11 = _goal(name="a b1 c1 d1 e1 f1 g1 h1 i1 j1 k1 coffee")
    assert type_reward(_product(name="acme coffee", **other), g11)["r_type"] == 0.1
    # no overlap at all -> 0 (even with a query match, as WebShop's code)
    t = type_reward(_product(name="acme tea"), g)
    assert t["query_match"] and t["r_type"] == 0.0
    # query match with a small overlap -> 1
    assert type_reward(_product(name="acme coffee"), g)["r_type"] == 1.0
    assert purchase_reward(_product(name="acme tea"), g, ["honey", "12 pack"]).reward == 0.0


def _reference_reward(product: Product, goal: Goal, chosen: list[str]) -> float:
    """Independent re-computation for synthetic data (there, fuzzy matching == exact matching)."""
    text = " ".join([product.name, *product.bullets, product.description]).lower()
    n_attr = sum(1 for a in goal.attributes if a in product.attributes or a in text)
    n_opt = sum(1 for _, v in goal.options if v in chosen)
    price = 1 if product.price <= goal.price_upper else 0
    base = (n_attr + n_opt + price) / (len(goal.attributes) + len(goal.options) + 1)
    # The noun filter (WebShop uses spaCy) is the one piece shared with the implementation.
    terms = title_terms
    desired, bought = terms(goal.name), set(terms(product.name))
    score = sum(1 for w in desired if w in bought) / len(desired) if desired else 0.2
    cats = lambda s: {x.strip() for x in s.split("›")}
    match = (
        product.query == goal.query
        or len(cats(product.product_category) & cats(goal.product_category)) >= 2
        or score > 0.2
    )
    r_type = 0.0 if score == 0 else 0.1 if score < 0.1 else 1.0 if match else 0.5
    return base * r_type


def test_reward_matches_reference_on_random_purchases(env):
    rng = random.Random(1)
    cat = env.catalog
    seen_levels = set()
    for _ in range(400):
        goal = cat.goals[rng.randrange(len(cat.goals))]
        product = cat.product(goal.asin) if rng.random() < 0.4 else rng.choice(cat.products)
        chosen = [rng.choice(vals) for _, vals in product.options if rng.random() < 0.8]
        got = purchase_reward(product, goal, chosen).reward
        want = _reference_reward(product, goal, chosen)
        assert got == pytest.approx(want), (goal, product, chosen)
        seen_levels.add(round(got, 3))
    assert len(seen_levels) > 5  # the sample exercises many reward values


def test_strict_success_only_for_exact_match(env):
    cat = env.catalog
    for goal in cat.goals[:60]:
        product = cat.product(goal.asin)
        exact = dict(goal.options)
        assert purchase_reward(product, goal, exact).success
        for name, value in goal.options:
            values = dict(product.options)[name]
            other = next((v for v in values if v != value), None)
            if other is not None:
                wrong = {**exact, name: other}
                assert not purchase_reward(product, goal, wrong).success
        if goal.options:
            assert not purchase_reward(product, goal, {}).success
        assert not purchase_reward(product, goal, exact, price=goal.price_upper + 1).success


def test_synthetic_values_are_fuzzy_distinct():
    for attrs in ATTRIBUTES.values():
        for a, b in itertools.combinations(attrs, 2):
            assert token_set_ratio(a, b) <= 85, (a, b)
    for values in OPTION_VALUES.values():
        for a, b in itertools.combinations(values, 2):
            assert token_set_ratio(a, b) <= 85, (a, b)


# ------------------------------------------------------------------------------------------------
# Catalog, search, splits


def test_synthetic_catalog_deterministic_and_consistent():
    a, b = synthetic_catalog(3, 60, 50), synthetic_catalog(3, 60, 50)
    assert a == b
    assert synthetic_catalog(4, 60, 50) != a
    assert len({p.name for p in a.products}) == len(a.products)
    for g in a.goals:
        p = a.product(g.asin)
        assert set(g.attributes) <= set(p.attributes)
        assert all(v in dict(p.options)[n] for n, v in g.options)
        assert g.price_upper > p.price
        assert g.instruction.endswith(f"price lower than {g.price_upper:.2f} dollars")
    with pytest.raises(ValueError):
        synthetic_catalog(0, num_products=0)


def test_splits_disjoint_and_deterministic(env):
    train, test = env.goals("train"), env.goals("test")
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == list(range(len(env.catalog.goals)))
    assert len(test) == 40 and env.goals("test") == test
    _, _ts = env.reset(seed=5, split="test")
    state, _ = env.reset(seed=5, split="test")
    assert state.goal_index in test
    with pytest.raises(ValueError):
        env.goals("dev")


def test_bm25_recall_and_determinism(env):
    search = env.search_engine
    goals = env.catalog.goals
    hits = sum(g.asin in search.search(env.instruction_query(g), 10) for g in goals)
    recall = hits / len(goals)
    print(f"BM25 recall@10 of the goal product from its instruction: {recall:.3f}")
    assert recall >= 0.8
    assert search.search("coffee", 50) == ProductSearch(env.catalog.products).search("coffee", 50)
    assert search.search("zzzz qqq", 10) == []
    # ties are broken by catalog order
    p = env.catalog.products[0]
    twins = ProductSearch(
        [p, Product(**{**p.__dict__, "asin": "zz1"}), p.__class__(**{**p.__dict__, "asin": "aa0"})]
    )
    assert twins.search(p.name, 3) == [p.asin, "zz1", "aa0"]


# ------------------------------------------------------------------------------------------------
# Env


def test_solver_reaches_reward_one_for_every_goal(env):
    for gi in range(len(env.catalog.goals)):
        state, ts = env.reset(gi)
        actions = env.solve(gi)
        assert len(actions) <= env.max_actions
        total = 0.0
        for a in actions:
            state, ts = env.step(state, env.format_response([a], "ok"))
            total += ts.reward
        assert ts.done and ts.success and ts.info["success"], (gi, actions, ts.info)
        assert total == 1.0 and ts.info["reward_info"]["reward"] == 1.0


def test_pages_and_navigation(env):
    gi = 0
    goal = env.goal(gi)
    state, ts = env.reset(gi)
    assert "available actions:\nsearch[<content>]" in ts.obs_text
    assert goal.instruction in ts.obs_text
    state, ts = env.step(state, ["search[black white red blue green]"])
    assert state.page == "results" and ts.invalid_action == 0
    first = env.available_actions(state)
    assert first[0] == "click[back to search]" and "click[next >]" in first
    assert sum(a[6:-1] in state.results for a in first) == 10
    state, ts = env.step(state, ["click [ Next > ]"])  # spacing / case insensitive
    assert state.results_page == 1 and "click[< prev]" in ts.obs_text
    asin = state.results[10]
    product = env.catalog.product(asin)
    state, ts = env.step(state, [f"click[{product.name}]"])  # click by title
    assert state.page == "item" and state.asin == asin
    assert "click[buy now]" in ts.obs_text and "click[description]" in ts.obs_text
    name, values = product.options[0]
    state, ts = env.step(state, [f"click[{values[-1]}]"])
    assert dict(state.selected) == {name: values[-1]}
    assert f"(selected: {values[-1]})" in ts.obs_text
    state, ts = env.step(state, ["click[features]"])
    assert state.page == "features" and product.bullets[0] in ts.obs_text
    state, ts = env.step(state, ["click[< prev]"])
    assert state.page == "item" and dict(state.selected) == {name: values[-1]}
    state, ts = env.step(state, ["click[< prev]"])
    assert state.page == "results" and state.results_page == 1
    state, ts = env.step(state, ["click[back to search]"])
    assert state.page == "search" and state.num_actions == 8 and not ts.done


def test_every_listed_action_is_valid_on_every_page(env):
    """Random walks over the listed actions (with the reference query on the search page): every
    action the page lists is accepted (no penalty, no invalid count) on every page type, the
    description / features pages included."""
    rng = random.Random(0)
    pages = set()
    for gi in env.goals("train")[:30]:
        state, ts = env.reset(gi)
        query = env.solve(gi)[0]
        while not ts.done:
            listed = env.available_actions(state)
            action = query if state.page == "search" else rng.choice(listed)
            pages.add(state.page)
            state, ts = env.step(state, [action])
            assert ts.invalid_action == 0 and ts.reward >= 0, (state.page, action, listed)
    assert pages >= {"search", "results", "item", "description", "features"}


def test_invalid_action_penalty_no_move(env):
    state0, _ = env.reset(3)
    for bad in ("click[buy now]", "search[]", "hello", "<answer>jump</answer>", ""):
        response = bad if bad.startswith("<answer>") else f"<answer>{bad}</answer>"
        state, ts = env.step(state0, response)
        assert ts.reward == pytest.approx(-0.1) and ts.invalid_action == 1
        assert state.page == "search" and state.num_actions == 1 and state.num_invalid == 1
        assert ts.info["invalid_action"] == 1 and ts.info["num_invalid_actions"] == 1
        assert ts.obs_text.startswith("your last action was invalid.")
    state, ts = env.step(state0, "no tags at all")
    assert ts.invalid_action == 1 and ts.reward == pytest.approx(-0.1)
    state, _ = env.step(state0, ["search[coffee]"])
    moved, ts = env.step(state, ["search[tea]"])  # no search bar on the results page
    assert ts.invalid_action == 1 and moved.results == state.results


def test_episode_cap(env):
    state, ts = env.reset(1)
    for i in range(9):
        assert not ts.done
        state, ts = env.step(state, ["click[nowhere]"])
        assert ts.num_actions == i + 1
    assert ts.done and not ts.success and state.reward == 0.0 and state.page == "done"
    state2, ts2 = env.step(state, ["search[x]"])
    assert state2 == state and ts2.reward == 0.0 and ts2.done
    # valid moves count too
    state, _ = env.reset(1)
    state, _ = env.step(state, ["search[coffee]"])
    for _ in range(8):
        state, ts = env.step(
            state, ["click[back to search]" if state.page != "search" else "search[tea]"]
        )
    assert ts.done and state.num_actions == 9 and env.max_turns == 9


def test_several_actions_per_turn():
    env = make(seed=0, num_products=60, num_goals=30, max_actions_per_turn=3, tokenizer=TOKENIZER)
    goal = env.goal(0)
    actions = env.solve(0)
    state, _ = env.reset(0)
    text = env.format_response([*actions[:3], "click[ignored]"])
    state, ts = env.step(state, text)
    assert state.num_actions == 3 and ts.info["num_dropped_actions"] == 1
    assert ts.info["actions"] == actions[:3]
    for i in range(3, len(actions), 3):
        state, ts = env.step(state, env.format_response(actions[i : i + 3]))
    assert ts.done and ts.success and state.bought == goal.asin
    # a buy in the middle ends the turn; actions after it are ignored
    state, _ = env.reset(0)
    state, _ = env.step(state, env.format_response(actions[:2]))
    state, ts = env.step(state, env.format_response(["click[buy now]", "click[back to search]"]))
    assert ts.done and state.num_actions == 3


def test_step_accepts_token_ids(env):
    state, _ = env.reset(2)
    ids = TOKENIZER.encode(env.format_response(["search[red shirt]"], "i think"))
    state, ts = env.step(state, ids)
    assert state.page == "results" and ts.invalid_action == 0
    state2, ts = env.step(state, np.array([1, 99999, -5]))
    assert ts.invalid_action == 1 and state2.page == "results"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.sampled_from(
            [*list("<>/[]|ab c\n"), "<answer>", "</answer>", "||", "click[", "search["]
        ),
        max_size=40,
    ).map("".join),
    st.integers(1, 4),
)
def test_parsing_fuzz(text, k):
    acts = parse_actions(text, k)
    assert len(acts) <= k and all(a and a == a.strip() for a in acts)
    if "</answer>" not in text:
        assert acts == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=60))
def test_step_never_crashes_on_garbage(env, text):
    state, _ = env.reset(4)
    for response in (
        text,
        f"<answer>{text}</answer>",
        f"<answer>click[{text}]||search[{text}]</answer>",
    ):
        new, ts = env.step(state, response)
        assert new.num_actions == 1 and ts.num_actions == 1
        assert ts.reward in (0.0, pytest.approx(-0.1))


def test_parse_actions_rules():
    assert parse_actions("<answer>a || b || c</answer>", 1) == ["a"]
    assert parse_actions("<answer>a</answer> then <answer> b ||  || c </answer>", 5) == ["b", "c"]
    assert parse_actions("<answer>a", 3) == [] and parse_actions("a</answer>", 3) == []
    assert parse_actions("</answer><answer>x", 3) == []


def test_observations_have_no_unknown_tokens(env):
    vocab_missing = [w for w in synthetic_vocabulary() if TOKENIZER.token_to_id(w) is None]
    assert vocab_missing == []
    texts = [
        env.system_prompt(),
        make(max_actions_per_turn=2, num_products=30, num_goals=5).system_prompt(),
    ]
    rng = random.Random(0)
    for gi in range(0, len(env.catalog.goals), 4):
        state, ts = env.reset(gi)
        texts.append(ts.obs_text)
        for a in env.solve(gi):
            state, ts = env.step(state, [a])
            texts.append(ts.obs_text)
        state, ts = env.reset(gi)
        while not ts.done:
            a = rng.choice([*env.available_actions(state), "click[nothing]"])
            a = a.replace("<content>", env.instruction_query(env.goal(gi)))
            state, ts = env.step(state, [a])
            texts.append(ts.obs_text)
            assert len(TOKENIZER.encode(ts.obs_text)) <= env.max_obs_len
    bad = {u for t in texts for u in unknown_tokens(TOKENIZER, t)}
    assert bad == set()
    assert TOKENIZER.encode(texts[2]) == env.reset(0)[1].obs_tokens


def test_registry_make():
    from actfocus_jax import envs

    e = envs.make("webshop", num_products=40, num_goals=20, max_actions=5)
    assert isinstance(e, WebShopEnv) and e.max_actions == 5 and len(e.catalog.goals) == 20
    assert e.is_host_env and e.max_turns == 5 and e.max_obs_len == 384
    state, _ = e.reset(e.catalog.goals[3])
    assert state.goal_index == 3
    short = WebShopEnv(e.catalog, TOKENIZER, max_obs_len=20)
    _, ts = short.reset(0)
    full = TOKENIZER.encode(ts.obs_text)
    assert ts.obs_tokens == full[:10] + full[-10:]


# ------------------------------------------------------------------------------------------------
# Loader of the real WebShop files


def _write_webshop_files(path):
    items = [
        {
            "asin": "B000ABC123",
            "name": "Acme Gluten Free Organic Coffee Beans",
            "category": "grocery",
            "query": "Coffee Beans ",
            "product_category": "Grocery & Gourmet Food › Beverages › Coffee",
            "pricing": "$12.99",
            "customization_options": {
                "Flavor Name": [
                    {"value": "Hazelnut", "image": None},
                    {"value": "Dark/Roast", "image": None},
                ],
                "Size": [{"value": "12 Ounce", "image": None}],
            },
            "small_description": ["Organic beans", "Roasted fresh"],
            "full_description": "Whole bean coffee that is gluten free.",
            "images": ["x.jpg"],
        },
        {
            "asin": "B000XYZ999",
            "name": "Nova Tea Bags",
            "category": "grocery",
            "query": "tea",
            "product_category": "Grocery & Gourmet Food › Beverages › Tea",
            "pricing": "$5.49 - $9.99",
            "customization_options": None,
            "small_description": [],
            "full_description": "",
            "images": [],
        },
        {"asin": "nan", "name": "skipped"},
        {"asin": "B000ABC123", "name": "duplicate"},
    ]
    attrs = {
        "B000ABC123": {
            "attributes": ["gluten free", "organic"],
            "instruction": "i want coffee",
            "instruction_attributes": ["organic"],
        },
        "B000XYZ999": {"attributes": ["caffeine free"]},
    }
    human = {
        "B000ABC123": [
            {
                "asin": "B000ABC123",
                "instruction": "i want organic coffee beans in hazelnut.",
                "instruction_attributes": ["organic"],
                "instruction_options": ["hazelnut"],
            },
            {
                "asin": "B000ABC123",
                "instruction": "no attrs",
                "instruction_attributes": [],
                "instruction_options": [],
            },
        ]
    }
    (path / "items_shuffle_1000.json").write_text(json.dumps(items))
    (path / "items_ins_v2_1000.json").write_text(json.dumps(attrs))
    (path / "items_human_ins.json").write_text(json.dumps(human))


def test_loader_reads_real_schema(tmp_path):
    _write_webshop_files(tmp_path)
    cat = load_catalog(tmp_path)
    assert [p.asin for p in cat.products] == ["b000abc123", "b000xyz999"]
    coffee, tea = cat.products
    assert coffee.name == "Acme Gluten Free Organic Coffee Beans" and coffee.query == "coffee beans"
    assert coffee.price == 12.99 and coffee.price_range is None and coffee.price_text == "$12.99"
    assert coffee.options == (
        ("flavor name", ("hazelnut", "dark | roast")),
        ("size", ("12 ounce",)),
    )
    assert coffee.attributes == ("gluten free", "organic") and coffee.bullets[0] == "Organic beans"
    assert tea.price == 5.49 and tea.price_range == (5.49, 9.99) and tea.options == ()
    assert len(cat.goals) == 1  # the goal without attributes is skipped, as WebShop
    g = cat.goals[0]
    assert g.asin == "b000abc123" and g.options == (("flavor name", "hazelnut"),)
    assert g.instruction.startswith("i want organic coffee beans in hazelnut, and price lower than")
    assert g.price_upper in (20.0, 30.0, 40.0, 50.0)
    env = WebShopEnv(cat, TOKENIZER)
    actions = env.solve(0)
    state, _ = env.reset(0)
    for a in actions:
        state, ts = env.step(state, [a])
    assert ts.success
    syn = load_catalog(tmp_path, human_goals=False)
    assert [g.instruction.split(",")[0] for g in syn.goals] == ["i want coffee"]


def test_loader_errors(tmp_path):
    with pytest.raises(CatalogError, match=r"items_shuffle_1000\.json.*items_human_ins\.json"):
        load_catalog(tmp_path / "missing")
    _write_webshop_files(tmp_path)
    (tmp_path / "items_human_ins.json").unlink()
    with pytest.raises(CatalogError, match=r"items_human_ins\.json"):
        load_catalog(tmp_path)
    assert load_catalog(tmp_path, human_goals=False).goals
    (tmp_path / "items_shuffle_1000.json").write_text("{not json")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path, human_goals=False)
    with pytest.raises(CatalogError):
        make(data_path=str(tmp_path / "nope"))


def test_every_synthetic_asin_is_one_token():
    cat = synthetic_catalog(0, num_products=MAX_PRODUCTS, num_goals=0)
    assert all(len(TOKENIZER.encode(p.asin)) == 1 for p in cat.products)
    assert TOKENIZER.token_to_id("<unk>") not in TOKENIZER.encode(
        " ".join(p.asin for p in cat.products)
    )
