"""The choice between a batch size's compiled package and eager, by their measured cost."""

from __future__ import annotations

from wallbreak.coe.engine.path_costs import PathCosts


def run(costs: PathCosts, seconds: dict[str, float], steps: int, key: str = "k", rows: int = 2) -> list[str]:
    """`steps` steps of one size, each path costing `seconds[path]`: the paths that ran."""
    ran = []
    for _ in range(steps):
        path = costs.choose(key, rows)
        costs.record(key, rows, path, seconds[path])
        ran.append(path)
    return ran


def test_each_path_is_timed_first_then_the_cheaper_runs_with_rare_exploring() -> None:
    costs = PathCosts(explore_every=8, warm=3)
    ran = run(costs, {"compiled": 0.010, "eager": 0.020}, 3 + 3 + 32)
    assert ran[:6] == ["compiled"] * 3 + ["eager"] * 3
    assert ran[6:].count("eager") == 4  # one step in 8 explores the dearer path
    assert costs.summary()["k"]["2"] == {"compiled_ms": 10.0, "eager_ms": 20.0, "runs": "compiled"}
    assert costs.costs("k", 2) == {"compiled": 0.010, "eager": 0.020}


def test_a_package_slower_than_eager_stops_running() -> None:
    """Checked for its answers, not its speed: a package that loses runs only to stay measured."""
    costs = PathCosts(explore_every=16, warm=2)
    ran = run(costs, {"compiled": 0.030, "eager": 0.020}, 2 + 2 + 64)
    assert ran[4:].count("compiled") == 4
    assert costs.cheaper("k", 2) == "eager"


def test_the_choice_follows_a_path_whose_cost_changes() -> None:
    costs = PathCosts(explore_every=4, warm=2, window=3)
    run(costs, {"compiled": 0.010, "eager": 0.020}, 20)
    assert costs.cheaper("k", 2) == "compiled"
    run(costs, {"compiled": 0.040, "eager": 0.020}, 20)  # say, another process took a core's cache
    assert costs.cheaper("k", 2) == "eager"


def test_one_slow_first_call_does_not_hand_the_size_to_eager() -> None:
    """A package's first call in a process can take many steps' time; the choice must not hang on it."""
    costs = PathCosts(explore_every=64, warm=4)
    costs.record("k", 3, "compiled", 0.400)  # the first call
    ran = run(costs, {"compiled": 0.017, "eager": 0.025}, 3 + 4 + 100, rows=3)
    assert ran[:7] == ["compiled"] * 3 + ["eager"] * 4
    assert ran[7:].count("eager") == 1


def test_sizes_and_architectures_are_measured_apart_and_forgotten_with_their_package() -> None:
    costs = PathCosts(explore_every=8, warm=1)
    run(costs, {"compiled": 0.030, "eager": 0.020}, 10, key="a", rows=2)
    run(costs, {"compiled": 0.010, "eager": 0.020}, 10, key="a", rows=3)
    run(costs, {"compiled": 0.010, "eager": 0.020}, 10, key="b", rows=2)
    chosen = (costs.cheaper("a", 2), costs.cheaper("a", 3), costs.cheaper("b", 2))
    assert chosen == ("eager", "compiled", "compiled")
    costs.forget("a", 2)  # a new package for that size: measured afresh, compiled first
    assert costs.choose("a", 2) == "compiled" and "2" not in costs.summary()["a"]


def test_a_batch_is_cut_into_the_largest_runs_that_have_a_compiled_step() -> None:
    from wallbreak.coe.engine.compiled import split_rows

    assert split_rows(5, {2, 3, 4}) == [4, 1]
    assert split_rows(9, {4}) == [4, 4, 1]
    assert split_rows(7, {2, 3, 4}) == [4, 3]
    assert split_rows(3, set()) == [1, 1, 1]  # one row always has its step
