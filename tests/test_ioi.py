"""The IOI dataset: rectangular, roles at the right positions, the model solves it, the corruption breaks it."""

import pytest
import torch

from utils.ioi import make_ioi_dataset, logit_diff
from utils.models import load_model


@pytest.fixture(scope="module")
def data(model):
    return make_ioi_dataset(model, n_prompts=16, seed=0)


def test_roles_sit_where_the_positions_say(model, data):
    rows = torch.arange(len(data))
    assert torch.equal(data.tokens[rows, data.positions["IO"]], data.io_tokens)
    assert torch.equal(data.tokens[rows, data.positions["S1"]], data.s_tokens)
    assert torch.equal(data.tokens[rows, data.positions["S2"]], data.s_tokens)
    assert (data.positions["S1"] < data.positions["S2"]).all()
    abba = torch.tensor([order == "ABBA" for order in data.orders])
    assert (data.positions["IO"][abba] < data.positions["S1"][abba]).all()
    assert (data.positions["IO"][~abba] > data.positions["S1"][~abba]).all()


def test_same_seed_same_prompts(model, data):
    assert make_ioi_dataset(model, n_prompts=16, seed=0).prompts == data.prompts
    assert make_ioi_dataset(model, n_prompts=16, seed=1).prompts != data.prompts


def test_smollm2_solves_ioi_and_the_abc_corruption_breaks_it(model, data):
    with torch.no_grad():
        clean = logit_diff(model(data.tokens), data)
        corrupted = data.corrupted(model)
        broken = logit_diff(model(corrupted.tokens), corrupted)
    assert (clean > 0).float().mean() >= 0.9 and clean.mean() > 2.5
    assert broken.mean() < clean.mean() / 2
    assert corrupted.tokens.shape == data.tokens.shape


def test_bad_inputs_are_explained(model, data):
    with pytest.raises(ValueError, match="ABBA"):
        make_ioi_dataset(model, n_prompts=4, orders=("ABC",))
    with pytest.raises(ValueError, match="n_prompts"):
        logit_diff(torch.zeros(3, 15, 10), data)


def test_abc_replaces_all_three_names(model, data):
    abc = data.abc(model)
    assert abc.tokens.shape == data.tokens.shape
    for role in ("IO", "S1", "S2"):
        assert (abc.tokens[torch.arange(len(data)), data.positions[role]]
                != data.tokens[torch.arange(len(data)), data.positions[role]]).all()
    rows = torch.arange(len(data))
    names = abc.tokens[rows[:, None], torch.stack([data.positions[r] for r in ("IO", "S1", "S2")], 1)]
    assert all(len(set(row.tolist())) == 3 for row in names)  # three different names, no repeat
    assert not (abc.tokens == data.io_tokens[:, None]).any() and not (abc.tokens == data.s_tokens[:, None]).any()
    other = (abc.tokens != data.tokens).sum(1)
    assert (other == 3).all()  # nothing else changed
    assert data.template_ids.shape == (len(data),) and data.template_ids.max() < 6
