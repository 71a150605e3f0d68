"""The greedy allocation and the search's starts: budgets met from below, the greedy follows the
sensitivity (raw or rescaled into model KL by the probe), impossible budgets fail clearly."""

import pytest
import torch
from test_pipeline import data_dir  # noqa: F401 (fixture)

from lowbit.budget.costs import BudgetError
from lowbit.budget.search import greedy, only_allocation, start_candidates
from lowbit.budget.sensitivity import kl_scaled, probe_level
from lowbit.levels import Level


def test_greedy_meets_the_budget_and_spends_it_where_error_falls_most():
    # 4 layers, 3 levels (bytes 10/20/30); layer 0 is very sensitive, layer 3 not at all
    costs = torch.tensor([[10, 20, 30]] * 4)
    errors = torch.tensor([[100.0, 10, 1], [10, 5, 4], [10, 6, 5], [1, 0.9, 0.8]])
    choice = greedy(costs, errors, budget=80)
    assert sum(int(costs[i, k]) for i, k in enumerate(choice)) <= 80
    assert choice[0] == 2 and choice[3] == 0
    uniform = float(errors[:, 1].sum())  # 2nd level everywhere costs the same 80 bytes
    assert sum(float(errors[i, k]) for i, k in enumerate(choice)) < uniform


def test_greedy_never_picks_a_dominated_level():
    costs = torch.tensor([[10, 20, 30]])
    errors = torch.tensor([[5.0, 6.0, 1.0]])  # level 1 costs more and is worse than level 0
    assert greedy(costs, errors, budget=25) == [0]
    assert greedy(costs, errors, budget=30) == [2]


def test_greedy_from_a_floor_only_upgrades():
    costs = torch.tensor([[10, 20, 30]] * 3)
    errors = torch.tensor([[100.0, 10, 1], [10, 5, 4], [1, 0.9, 0.8]])
    assert greedy(costs, errors, budget=60, floor=[1, 1, 1]) == [1, 1, 1]
    choice = greedy(costs, errors, budget=70, floor=[1, 1, 1])
    assert choice == [2, 1, 1]  # the one upgrade that fits goes where error falls most
    assert greedy(costs, errors, budget=70) == [2, 2, 0]  # from the smallest level it differs
    with pytest.raises(BudgetError, match="smallest allocation"):
        greedy(costs, errors, budget=59, floor=[1, 1, 1])


def test_start_candidates_include_the_uniform_levels_that_fit():
    costs = torch.tensor([[10, 20, 30]] * 3)
    errors = torch.tensor([[100.0, 10, 1], [10, 5, 4], [1, 0.9, 0.8]])
    levels = [Level(2, 32), Level(3, 32), Level(4, 32)]
    cands = start_candidates(costs, errors, 60, levels)
    assert cands["uniform w3g32"] == [1, 1, 1]       # exactly the budget
    assert "uniform w4g32" not in cands and "w4g32 + greedy" not in cands  # 90 bytes do not fit
    assert "uniform w2g32" not in cands              # 30 of 60 bytes is not within 1%
    assert cands["greedy"] == greedy(costs, errors, 60)
    assert len({tuple(c) for c in cands.values()}) == len(cands)  # no duplicates
    assert all(sum(int(costs[i, k]) for i, k in enumerate(c)) <= 60 for c in cands.values())


def test_greedy_refuses_a_budget_below_the_smallest_allocation():
    with pytest.raises(BudgetError, match="smallest allocation"):
        greedy(torch.tensor([[10, 20]] * 3), torch.ones(3, 2), budget=29)


def test_only_allocation_is_found_when_no_layer_can_move_up():
    costs = torch.tensor([[10, 20, 30], [12, 24, 36], [10, 20, 30]])
    assert only_allocation(costs, budget=32) == [0, 0, 0]
    assert only_allocation(costs, budget=41) == [0, 0, 0]  # the cheapest upgrade needs 10 more
    assert only_allocation(costs, budget=42) is None       # layer 0 or 2 can move up
    assert only_allocation(torch.tensor([[10, 10, 30]]), budget=10) is None  # two levels of one size: a choice
    with pytest.raises(BudgetError, match="smallest allocation"):
        only_allocation(costs, budget=31)


def test_kl_scaling_keeps_each_layers_ranking_and_matches_the_probe():
    errors = torch.tensor([[100.0, 10, 1], [10, 5, 4]])
    probe = torch.tensor([0.01, 2.0])  # layer 1 matters far more at the model's output
    scaled = kl_scaled(errors, probe, k=1)
    assert torch.allclose(scaled[:, 1], probe)
    assert torch.equal(scaled.argsort(1), errors.argsort(1))
    costs = torch.tensor([[10, 20, 30]] * 2)
    assert greedy(costs, errors, 40) == [2, 0]        # the raw output error spends on layer 0
    assert greedy(costs, scaled, 40) == [0, 2]        # the probe moves the bytes to layer 1
    cands = start_candidates(costs, errors, 40, [Level(2, 32), Level(3, 32), Level(4, 32)], kl_errors=scaled)
    assert cands["kl-greedy"] == [0, 2] and cands["greedy"] == [2, 0]


def test_the_probe_level_is_the_widest_that_fits_everywhere():
    costs = torch.tensor([[10, 20, 30]] * 3)
    assert probe_level(costs, 75) == 1 and probe_level(costs, 90) == 2 and probe_level(costs, 20) == 0
