"""utils.ablation: the batched every-head ablation agrees with one-head-at-a-time runs, and direct effects add up."""

import pytest
import torch

from utils import ablation
from utils.ioi import logit_diff, make_ioi_dataset


@pytest.fixture(scope="module")
def model():
    from utils.models import model_for_checks

    return model_for_checks()


def test_batched_ablation_matches_single_runs(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=3, templates_per_order=1)
    z, final = ablation.head_z(model, data.tokens)
    readout = ablation.ioi_readout(model, data.io_tokens, data.s_tokens)
    assert torch.allclose(readout(final), logit_diff(model(data.tokens), data), atol=1e-3)
    mean = z.mean(1, keepdim=True)
    grid = ablation.ablate_every_head(model, data.tokens, mean, readout, layers=[27])
    assert grid.shape == (1, model.cfg.n_heads, 2)
    for head in (0, 5):
        hook = ablation.mean_ablation_hook(z[27], head)
        with torch.no_grad():
            logits = model.run_with_hooks(data.tokens, fwd_hooks=[(ablation.z_name(27), hook)])
        assert torch.allclose(grid[0, head], logit_diff(logits, data), atol=1e-3)
    model.reset_hooks()


def test_direct_effects_sum_to_attention_share(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=4)
    z, final = ablation.head_z(model, data.tokens)
    every = ablation.all_direct_effects(model, z, final, data.io_tokens, data.s_tokens)
    one = ablation.head_direct_effect(model, z[12], final, 12, 4, data.io_tokens, data.s_tokens)
    assert torch.allclose(every[12, 4], one, atol=1e-4)
