"""Chapter 07's checks: the usual mistakes are rejected with a specific message. (tests/test_checks_generic.py
covers every check's reference on the hidden cases, its stub reported as not attempted, and hard-coded visible
outputs rejected.)
Also unit tests of utils/superposition.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.check_helpers import passes, rejected
from utils import superposition as sup
from utils.checks import ch07


def test_registry_lists_eleven_exercises():
    from utils.checks import chapter_exercises

    assert [entry.number for entry in chapter_exercises("07").values()] == [f"7.{i}" for i in range(1, 12)]


# utils/superposition.py ---------------------------------------------------------------------------------

def test_generate_batch_density_and_values():
    x = sup.generate_batch(2, 50, 4000, torch.tensor([0.1, 0.6]), 0)
    assert x.shape == (4000, 2, 50)
    density = (x > 0).float().mean((0, 2))
    assert abs(density[0] - 0.1) < 0.01 and abs(density[1] - 0.6) < 0.01
    assert x.max() <= 1 and x.min() >= 0
    assert torch.equal(x, sup.generate_batch(2, 50, 4000, torch.tensor([0.1, 0.6]), 0))
    with pytest.raises(ValueError, match="feature_probability"):
        sup.generate_batch(2, 5, 10, torch.tensor([0.1, 0.2, 0.3]), 0)


def test_metrics_on_known_geometries():
    pentagon = torch.stack([torch.cos(torch.arange(5) * 2 * math.pi / 5), torch.sin(torch.arange(5) * 2 * math.pi / 5)])
    D = sup.feature_dimensionality(pentagon[None])
    assert torch.allclose(D, torch.full((1, 5), 0.4), atol=1e-5)
    antipodal = torch.tensor([[[1.0, -1.0, 0.0]]])  # two features on one line, a third dropped
    assert torch.allclose(sup.feature_dimensionality(antipodal), torch.tensor([[0.5, 0.5, 0.0]]))
    stats = sup.superposition_stats(antipodal)
    assert stats["n_represented"].tolist() == [2]
    assert torch.allclose(stats["interference"], torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(stats["features_per_dimension"], torch.tensor([2.0]))
    assert sup.classify_phases(torch.tensor([[[1.0, -1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])).tolist() == [2, 0, 1]
    counts = sup.plateau_counts(torch.tensor([[0.4, 0.5, 0.2, 0.38]]), torch.tensor([[1.0, 1.0, 1.0, 0.1]]))
    assert counts["2/5"] == 1 and counts["1/2"] == 1 and counts["other"] == 1 and counts["represented"] == 3
    assert torch.allclose(sup.feature_angles(torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])), torch.tensor([[90.0, 180.0]]))


def test_training_finds_the_pentagon():
    model = sup.train_toy_models(5, 2, torch.tensor([0.03, 0.03]), 1.0, steps=1500, batch_size=256, seed=0)
    stats = sup.superposition_stats(model["W"])
    assert stats["n_represented"].tolist() == [5, 5]


def test_max_cosine_similarity_finds_the_copy():
    features = torch.randn(4, 3)
    W_dec = torch.cat([torch.randn(5, 3), 2 * features[[2, 0, 3, 1]]])
    best, index = sup.max_cosine_similarity(W_dec, features)
    assert torch.allclose(best, torch.ones(4), atol=1e-5) and index.tolist() == [6, 8, 5, 7]


# 7.1 ------------------------------------------------------------------------------------------------------

def _draws(n_inst, n_features, batch_size, p, seed):
    p = sup._per_instance(p, n_inst, n_features, "p")
    generator = torch.Generator().manual_seed(seed)
    first = torch.rand(batch_size, n_inst, n_features, generator=generator)
    return p, first, torch.rand(batch_size, n_inst, n_features, generator=generator)


def test_generate_batch_mask_first_rejected():
    def answer(n_inst, n_features, batch_size, p, seed):
        p, first, second = _draws(n_inst, n_features, batch_size, p, seed)
        return (first < p) * second

    rejected(ch07.generate_batch, answer, "mask before the values")


def test_generate_batch_inverted_probability_rejected():
    def answer(n_inst, n_features, batch_size, p, seed):
        p, first, second = _draws(n_inst, n_features, batch_size, p, seed)
        return first * (second >= p)

    rejected(ch07.generate_batch, answer, "1 - p")


def test_generate_batch_ones_rejected():
    def answer(n_inst, n_features, batch_size, p, seed):
        p, first, second = _draws(n_inst, n_features, batch_size, p, seed)
        return (second < p).float()

    rejected(ch07.generate_batch, answer, "uniform values")


def test_generate_batch_global_rng_rejected():
    def answer(n_inst, n_features, batch_size, p, seed):
        p = sup._per_instance(p, n_inst, n_features, "p")
        return torch.rand(batch_size, n_inst, n_features) * (torch.rand(batch_size, n_inst, n_features) < p)

    rejected(ch07.generate_batch, answer, "global random state")


def test_generate_batch_wrong_layout_rejected():
    rejected(ch07.generate_batch, lambda *args: sup.generate_batch(*args).transpose(0, 1), "[batch, n_inst")


# 7.2 ------------------------------------------------------------------------------------------------------

def test_forward_without_bias_rejected():
    rejected(ch07.toy_forward, lambda W, b, x, o, h: sup.toy_forward(W, torch.zeros_like(b), x, o, h), "b_final")


def test_forward_always_relu_rejected():
    rejected(ch07.toy_forward, lambda W, b, x, o, h: sup.toy_forward(W, b, x, True, h), "output ReLU")


def test_forward_ignores_hidden_relu_rejected():
    rejected(ch07.toy_forward, lambda W, b, x, o, h: sup.toy_forward(W, b, x, o, False), "hidden layer")


def test_forward_bias_after_relu_rejected():
    def answer(W, b, x, output_relu, hidden_relu):
        out = sup.toy_forward(W, torch.zeros_like(b), x, output_relu, hidden_relu)
        return out + b

    rejected(ch07.toy_forward, answer, "after the ReLU")


def test_forward_wrong_contraction_rejected():
    rejected(ch07.toy_forward, lambda W, b, x, o, h: torch.einsum("imn,bin->bim", W, x), "shape")


# 7.3 ------------------------------------------------------------------------------------------------------

def test_loss_without_importance_rejected():
    rejected(ch07.weighted_mse, lambda out, x, importance: (x - out).pow(2).sum(-1).mean(0), "importance")


def test_loss_mean_over_features_rejected():
    rejected(ch07.weighted_mse, lambda out, x, importance: (importance * (x - out).pow(2)).mean(-1).mean(0),
             "averaged over features")


def test_loss_scalar_rejected():
    rejected(ch07.weighted_mse, lambda out, x, importance: sup.weighted_mse(out, x, importance).sum(), "[n_inst]")


def test_loss_squared_importance_rejected():
    rejected(ch07.weighted_mse, lambda out, x, importance: (importance * (x - out)).pow(2).sum(-1).mean(0),
             "squared the importance")


# 7.4 ------------------------------------------------------------------------------------------------------

def test_training_without_importance_rejected():
    def answer(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed):
        return sup.train_toy_models(n, m, p, 1.0, output_relu, hidden_relu, steps, batch, lr, seed)

    rejected(ch07.train_toy_models, answer, "importance")


def test_training_that_barely_trains_rejected():
    def answer(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed):
        return sup.train_toy_models(n, m, p, importance, output_relu, hidden_relu, 3, batch, lr, seed)

    rejected(ch07.train_toy_models, answer, "held-out loss")


def test_training_with_global_rng_rejected():
    def answer(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed):
        return sup.train_toy_models(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr,
                                    int(torch.randint(0, 1000, (1,))))

    rejected(ch07.train_toy_models, answer, "same seed")


def test_training_wrong_shape_rejected():
    def answer(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed):
        model = sup.train_toy_models(n, m, p, importance, output_relu, hidden_relu, 2, batch, lr, seed)
        return {"W": model["W"].transpose(1, 2), "b_final": model["b_final"]}

    rejected(ch07.train_toy_models, answer, "W should have shape")


# 7.5 ------------------------------------------------------------------------------------------------------

def test_angles_in_radians_rejected():
    rejected(ch07.feature_angles, lambda W: torch.deg2rad(sup.feature_angles(W)), "radians")


def test_negative_angles_rejected():
    rejected(ch07.feature_angles, lambda W: torch.rad2deg(torch.atan2(W[:, 1], W[:, 0])), "[0, 360)")


def test_swapped_coordinates_rejected():
    rejected(ch07.feature_angles, lambda W: torch.rad2deg(torch.atan2(W[:, 0], W[:, 1])) % 360, "swapped")


# 7.6 ------------------------------------------------------------------------------------------------------

def _stats_with(**changes):
    def answer(W, threshold):
        out = sup.superposition_stats(W, threshold)
        out.update({key: change(W, threshold, out) for key, change in changes.items()})
        return out

    return answer


def _overlaps(W, normalise_j=False):
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.einsum("kmi,kmj->kij", unit, unit if normalise_j else W)


def test_stats_row_norms_rejected():
    rejected(ch07.superposition_stats, _stats_with(norms=lambda W, t, out: W.norm(dim=2)), "rows")


def test_stats_interference_with_self_rejected():
    rejected(ch07.superposition_stats, _stats_with(interference=lambda W, t, out: _overlaps(W).pow(2).sum(-1)),
             "j = i")


def test_stats_cosine_interference_rejected():
    off = lambda W: 1 - torch.eye(W.shape[2])  # noqa: E731
    rejected(ch07.superposition_stats,
             _stats_with(interference=lambda W, t, out: (_overlaps(W, True).pow(2) * off(W)).sum(-1)), "W_j too")


def test_stats_unnormalised_interference_rejected():
    off = lambda W: 1 - torch.eye(W.shape[2])  # noqa: E731
    rejected(ch07.superposition_stats,
             _stats_with(interference=lambda W, t, out: (torch.einsum("kmi,kmj->kij", W, W).pow(2) * off(W)).sum(-1)),
             "normalise W_i")


def test_stats_nan_for_zero_feature_rejected():
    def nan_interference(W, t, out):
        unit = W / W.norm(dim=1, keepdim=True)
        return (torch.einsum("kmi,kmj->kij", unit, W).pow(2) * (1 - torch.eye(W.shape[2]))).sum(-1)

    rejected(ch07.superposition_stats, _stats_with(interference=nan_interference), "NaN")


def test_stats_per_feature_not_dimension_rejected():
    rejected(ch07.superposition_stats,
             _stats_with(features_per_dimension=lambda W, t, out: W.pow(2).sum((1, 2)) / W.shape[2]), "divide")


def test_stats_float_count_rejected():
    rejected(ch07.superposition_stats, _stats_with(n_represented=lambda W, t, out: (out["norms"] > t).float().sum(-1)),
             "integer")


# 7.7 ------------------------------------------------------------------------------------------------------

def test_dimensionality_without_self_rejected():
    def answer(W):
        norms = W.norm(dim=1)
        off = (_overlaps(W).pow(2) * (1 - torch.eye(W.shape[2]))).sum(-1)
        return torch.where(norms > 1e-8, norms.pow(2) / off.clamp_min(1e-8), torch.zeros_like(norms))

    rejected(ch07.feature_dimensionality, answer, "leaves out j = i")


def test_dimensionality_unsquared_norm_rejected():
    def answer(W):
        norms = W.norm(dim=1)
        return torch.where(norms > 1e-8, norms / _overlaps(W).pow(2).sum(-1).clamp_min(1e-8), torch.zeros_like(norms))

    rejected(ch07.feature_dimensionality, answer, "squared")


def test_dimensionality_nan_rejected():
    rejected(ch07.feature_dimensionality,
             lambda W: W.norm(dim=1).pow(2) / torch.einsum("kmi,kmj->kij", W / W.norm(dim=1, keepdim=True), W)
             .pow(2).sum(-1), "NaN")


# 7.9 ------------------------------------------------------------------------------------------------------

def test_phases_ignoring_sign_rejected():
    def answer(W, threshold):
        w1, w2 = W[:, 0, 0].abs() > threshold, W[:, 0, 1].abs() > threshold
        return torch.where(w1 & w2, 2, torch.where(w2, 1, 0))

    rejected(ch07.classify_phases, answer, "opposite")


def test_phases_without_abs_rejected():
    def answer(W, threshold):
        w1, w2 = W[:, 0, 0], W[:, 0, 1]
        return torch.where((w1 * w2 < 0) & (w1.abs() > threshold) & (w2.abs() > threshold), 2,
                           torch.where(w2 > threshold, 1, 0))

    rejected(ch07.classify_phases, answer, "|w|")


def test_phases_wrong_feature_rejected():
    def answer(W, threshold):
        phase = sup.classify_phases(W.flip(-1), threshold)
        return phase

    rejected(ch07.classify_phases, answer, "feature 2")


def test_phases_float_rejected():
    rejected(ch07.classify_phases, lambda W, t: sup.classify_phases(W, t).float(), "integer")


# 7.8 ------------------------------------------------------------------------------------------------------

def test_plateaus_counting_dropped_features_rejected():
    rejected(ch07.plateau_counts, lambda D, norms, t, tol: sup.plateau_counts(D, torch.ones_like(norms), 0.5, tol),
             "represented ones")


def test_plateaus_double_counting_rejected():
    def answer(D, norms, threshold, tolerance):
        D = D[norms > threshold]
        counts = {name: int(((D - value).abs() <= tolerance).sum()) for name, value in sup.PLATEAUS.items()}
        on_any = torch.zeros_like(D, dtype=torch.bool)
        for value in sup.PLATEAUS.values():
            on_any |= (D - value).abs() <= tolerance
        counts["other"] = int((~on_any).sum())
        counts["represented"] = int(D.numel())
        return counts

    rejected(ch07.plateau_counts, answer, "two plateaus")


def test_plateaus_missing_key_rejected():
    def answer(D, norms, threshold, tolerance):
        counts = sup.plateau_counts(D, norms, threshold, tolerance)
        del counts["other"]
        return counts

    rejected(ch07.plateau_counts, answer, "keys")


# 7.10 -----------------------------------------------------------------------------------------------------

def test_neurons_counting_negative_weights_rejected():
    rejected(ch07.neuron_feature_counts, lambda W, t: (W.abs() > t).sum(-1), "negative")


def test_neurons_counted_per_feature_rejected():
    rejected(ch07.neuron_feature_counts, lambda W, t: (W > t).sum(1), "per neuron")


# 7.11 -----------------------------------------------------------------------------------------------------

def test_cosine_dot_products_rejected():
    rejected(ch07.max_cosine_similarity, lambda W_dec, f: (f @ W_dec.T).max(-1), "normalise")


def test_cosine_abs_rejected():
    def answer(W_dec, features):
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        best = (unit(features) @ unit(W_dec).T).abs().max(-1)
        return best.values, best.indices

    rejected(ch07.max_cosine_similarity, answer, "|cos|")


def test_cosine_per_latent_rejected():
    def answer(W_dec, features):
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        best = (unit(W_dec) @ unit(features).T).max(-1)
        return best.values, best.indices

    rejected(ch07.max_cosine_similarity, answer, "per SAE latent")
