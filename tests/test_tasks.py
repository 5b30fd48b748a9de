"""TFDS task sets: built by the project's builders, read through tfds.data_source, disjoint splits."""

import jax
import numpy as np
import pytest

from actfocus_jax import envs
from actfocus_jax.data.tasks import (
    TaskSetError,
    build_task_set,
    generate_tasks,
    load_tasks,
    task_fingerprint,
)


@pytest.mark.parametrize("env_name", ["sokoban", "frozenlake", "sudoku"])
def test_task_set_round_trip_and_disjoint_splits(tmp_path, env_name):
    builder = build_task_set(tmp_path, env_name, num_train=12, num_test=6, seed=3)
    env = envs.make(env_name)
    train, train_ids, train_len = load_tasks(builder, "train")
    test, _, _ = load_tasks(builder, "test")
    assert len(train_ids) == 12 and sorted(train_ids.tolist()) == list(range(12))
    assert jax.tree.leaves(test)[0].shape[0] == 6
    unstack = lambda tree, n: [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]
    fp_train = {task_fingerprint(t) for t in unstack(train, 12)}
    fp_test = {task_fingerprint(t) for t in unstack(test, 6)}
    assert len(fp_train) == 12 and len(fp_test) == 6
    assert not fp_train & fp_test
    # The stored tasks equal the generator's output, and the stored solution length is the solver's.
    ref = generate_tasks(env, 12, 6, seed=3)
    ref_fps = [task_fingerprint(t) for t, _ in ref["train"]]
    order = np.argsort(train_ids)
    got = unstack(train, 12)
    for j, i in enumerate(order):
        assert task_fingerprint(got[i]) == ref_fps[j]
        assert train_len[i] == len(ref["train"][j][1])
    # Building again reuses the files (same name, same content).
    again = build_task_set(tmp_path, env_name, num_train=12, num_test=6, seed=3)
    assert again.data_dir == builder.data_dir


def test_too_few_distinct_tasks_is_a_clear_error():
    class Tiny:
        name = "tiny"

        def generate_task(self, rng):
            return {"x": np.asarray(rng.integers(0, 2), np.int32)}

        def solve(self, task):
            return []

    with pytest.raises(TaskSetError, match="distinct"):
        generate_tasks(Tiny(), 5, 5, seed=0)


def test_bad_split_name(tmp_path):
    builder = build_task_set(tmp_path, "sudoku", num_train=2, num_test=2, seed=0)
    with pytest.raises(TaskSetError, match="split"):
        load_tasks(builder, "validation")
