"""Checks for chapter 07 — Superposition in toy models.

References come from `utils.superposition`. Each check calls the learner's function on small cases (random
weights with m != n, hand-built weights for the phases, tiny trainings) and, when it is wrong, compares it with
the usual mistakes to say which one.
"""

from __future__ import annotations

import math

import torch

from utils import superposition as _sup
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator


def _close(got, expected, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    if got.dtype.is_floating_point != expected.dtype.is_floating_point and not expected.dtype.is_floating_point:
        return False
    return torch.allclose(got.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
                          atol=atol, rtol=rtol, equal_nan=False)


def _shape_of(got) -> str:
    return str(tuple(got.shape)) if isinstance(got, torch.Tensor) else type(got).__name__


def random_weights(n_inst: int, d_hidden: int, n_features: int, generator: torch.Generator,
                   zero_feature: bool = False) -> torch.Tensor:
    """Random W [n_inst, m, n] with columns of varied norms (some below 0.5), optionally one zero column."""
    W = torch.randn(n_inst, d_hidden, n_features, generator=generator)
    W = W / W.norm(dim=1, keepdim=True) * (0.1 + 1.4 * torch.rand(n_inst, 1, n_features, generator=generator))
    if zero_feature:
        W[0, :, 1] = 0.0
    return W


# ---------------------------------------------------------------------------------------------------------
# 7.1 — the data
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.1", "generate_batch", "Sparse synthetic features", points=1, reference=_sup.generate_batch)
def generate_batch(answer, hidden):
    expect_callable(answer, "generate_batch")
    cases = [(3, 4, 64, torch.tensor([1.0, 0.5, 0.1]), 0),
             (2, 5, 40, torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]]), 1),
             (4, 3, 30, 0.25, 2)]
    if hidden:
        generator = hidden_generator(71)
        cases += [(5, 6, 48, torch.rand(5, generator=generator), int(torch.randint(0, 10**6, (1,), generator=generator))),
                  (3, 7, 25, torch.rand(3, 7, generator=generator), int(torch.randint(0, 10**6, (1,), generator=generator)))]
    for i, (n_inst, n_features, batch_size, p, seed) in enumerate(cases):
        what = f"case {i} (n_inst {n_inst}, n_features {n_features}, batch {batch_size}, seed {seed})"
        p_in = p.clone() if isinstance(p, torch.Tensor) else p
        got = answer(n_inst, n_features, batch_size, p_in, seed)
        expected = _sup.generate_batch(n_inst, n_features, batch_size, p, seed)
        if _close(got, expected, atol=1e-7):
            continue
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n_inst, batch_size, n_features) != tuple(expected.shape):
            raise CheckFailed(f"{what}: your batch is [n_inst, batch, n_features]; the course's layout is [batch, "
                              f"n_inst, n_features] (the batch first, as toy_forward expects).")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)} [batch, n_inst, "
                              f"n_features], got {_shape_of(got)}.")
        pp = _sup._per_instance(p, n_inst, n_features, "p")
        generator = torch.Generator().manual_seed(seed)
        first = torch.rand(batch_size, n_inst, n_features, generator=generator)
        second = torch.rand(batch_size, n_inst, n_features, generator=generator)
        if _close(got, (first < pp) * second, atol=1e-7):
            raise CheckFailed(f"{what}: you drew the mask before the values; draw the values first (torch.rand), "
                              f"then the mask (torch.rand < p), from one generator.")
        if _close(got, first * (second >= pp), atol=1e-7):
            raise CheckFailed(f"{what}: your features are present with probability 1 - p; a feature is present "
                              f"where the second draw is < p (p is the feature probability, not the sparsity).")
        if _close(got, (second < pp).float(), atol=1e-7):
            raise CheckFailed(f"{what}: present features all equal 1; multiply the mask by the uniform values.")
        again = answer(n_inst, n_features, batch_size, p_in, seed)
        if isinstance(again, torch.Tensor) and not torch.equal(again, got):
            raise CheckFailed(f"{what}: two calls with the same seed gave different batches; draw from "
                              f"torch.Generator().manual_seed(seed), not from the global random state.")
        expect_tensor(got, expected, what, atol=1e-7,
                      hint="values = torch.rand(...); mask = torch.rand(...) < p, both [batch, n_inst, n_features] "
                           "from one torch.Generator().manual_seed(seed); return values * mask.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.2 — the forward pass
# ---------------------------------------------------------------------------------------------------------


def _forward_cases(hidden: bool):
    generator = torch.Generator().manual_seed(72)
    cases = []
    for n_inst, m, n, batch, output_relu, hidden_relu in [(3, 2, 5, 7, True, False), (2, 3, 6, 4, False, False),
                                                          (2, 3, 6, 5, True, True)]:
        cases.append((torch.randn(n_inst, m, n, generator=generator), 0.3 * torch.randn(n_inst, n, generator=generator),
                      torch.rand(batch, n_inst, n, generator=generator), output_relu, hidden_relu))
    if hidden:
        generator = hidden_generator(72)
        for n_inst, m, n, batch, output_relu, hidden_relu in [(4, 3, 7, 6, True, False), (3, 2, 9, 5, True, True),
                                                              (2, 4, 5, 3, False, True)]:
            cases.append((torch.randn(n_inst, m, n, generator=generator),
                          0.3 * torch.randn(n_inst, n, generator=generator),
                          torch.rand(batch, n_inst, n, generator=generator), output_relu, hidden_relu))
    return cases


@exercise("07", "7.2", "toy_forward", "The toy model's forward pass", points=2, reference=_sup.toy_forward)
def toy_forward(answer, hidden):
    expect_callable(answer, "toy_forward")
    for i, (W, b, x, output_relu, hidden_relu) in enumerate(_forward_cases(hidden)):
        what = (f"case {i} (W {tuple(W.shape)}, x {tuple(x.shape)}, output_relu={output_relu}, "
                f"hidden_relu={hidden_relu})")
        got = answer(W.clone(), b.clone(), x.clone(), output_relu, hidden_relu)
        expected = _sup.toy_forward(W, b, x, output_relu, hidden_relu)
        if _close(got, expected):
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} [batch, n_inst, n], got "
                              f"{_shape_of(got)}. h = W x has m entries per instance; the output W^T h has n.")
        if _close(got, _sup.toy_forward(W, torch.zeros_like(b), x, output_relu, hidden_relu)):
            raise CheckFailed(f"{what}: your output ignores b_final; add it before the output ReLU.")
        if _close(got, _sup.toy_forward(W, b, x, not output_relu, hidden_relu)):
            raise CheckFailed(f"{what}: apply the output ReLU only when output_relu is True (it is {output_relu}).")
        if _close(got, _sup.toy_forward(W, b, x, output_relu, not hidden_relu)):
            raise CheckFailed(f"{what}: apply the ReLU to the hidden layer h only when hidden_relu is True (it is "
                              f"{hidden_relu}).")
        plain = torch.einsum("imn,bim->bin", W, torch.einsum("imn,bin->bim", W, x))
        if output_relu and _close(got, plain.relu() + b):
            raise CheckFailed(f"{what}: you added b_final after the ReLU; add it before: ReLU(W^T h + b).")
        expect_tensor(got, expected, what, atol=1e-5, hint="h = einsum('imn,bin->bim', W, x); "
                                                           "out = einsum('imn,bim->bin', W, h) + b_final.")
    return "linear, ReLU output, ReLU hidden layer"


# ---------------------------------------------------------------------------------------------------------
# 7.3 — the loss
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.3", "weighted_mse", "The importance-weighted loss", points=1, reference=_sup.weighted_mse)
def weighted_mse(answer, hidden):
    expect_callable(answer, "weighted_mse")
    generator = torch.Generator().manual_seed(73)
    cases = [(torch.rand(8, 3, 5, generator=generator), torch.rand(8, 3, 5, generator=generator),
              0.7 ** torch.arange(5.0)),
             (torch.rand(6, 2, 4, generator=generator), torch.rand(6, 2, 4, generator=generator),
              torch.rand(2, 4, generator=generator) + 0.1)]
    if hidden:
        generator = hidden_generator(73)
        cases += [(torch.rand(5, 4, 6, generator=generator), torch.rand(5, 4, 6, generator=generator),
                   torch.rand(4, 6, generator=generator)),
                  (torch.rand(9, 2, 7, generator=generator), torch.rand(9, 2, 7, generator=generator),
                   torch.rand(7, generator=generator) + 0.2)]
    for i, (out, x, importance) in enumerate(cases):
        what = f"case {i} (batch {x.shape[0]}, n_inst {x.shape[1]}, n {x.shape[2]}, importance {tuple(importance.shape)})"
        got = answer(out.clone(), x.clone(), importance.clone())
        expected = _sup.weighted_mse(out, x, importance)
        if _close(got, expected):
            continue
        imp = _sup._per_instance(importance, x.shape[1], x.shape[2], "importance")
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            if abs(float(got) - float(expected.sum())) < 1e-4 or abs(float(got) - float(expected.mean())) < 1e-4:
                raise CheckFailed(f"{what}: you returned one number; return the loss of each instance, [n_inst] "
                                  f"(the training loop sums them).")
            raise CheckFailed(f"{what}: return the loss of each instance, shape [n_inst], not a scalar.")
        if _close(got, (x - out).pow(2).sum(-1).mean(0)):
            raise CheckFailed(f"{what}: your loss ignores the importance; weigh each feature's squared error by I_i.")
        if _close(got, (imp * (x - out).pow(2)).mean(-1).mean(0)):
            raise CheckFailed(f"{what}: you averaged over features; sum the weighted squared errors over features "
                              f"and average over the batch.")
        if _close(got, (imp * (x - out).pow(2)).sum(-1).sum(0)):
            raise CheckFailed(f"{what}: you summed over the batch; average over it.")
        if _close(got, (imp * (x - out)).pow(2).sum(-1).mean(0)):
            raise CheckFailed(f"{what}: you squared the importance too; weigh the squared error: I_i (x_i - out_i)^2.")
        expect_tensor(got, expected, what, atol=1e-5, hint="(importance * (x - out) ** 2).sum(-1).mean(0).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.4 — the training loop
# ---------------------------------------------------------------------------------------------------------


def _training_cases(hidden: bool):
    # (n_features, d_hidden, feature_probability, importance, output_relu, hidden_relu, steps, batch, lr, seed)
    cases = [(5, 2, torch.tensor([1.0, 0.3, 0.05]), 0.9 ** torch.arange(5.0), True, False, 200, 128, 1e-2, 0),
             (3, 1, torch.ones(4), torch.tensor([1.0, 0.1, 0.01]), False, False, 150, 64, 1e-2, 1)]
    if hidden:
        generator = hidden_generator(74)
        seed = int(torch.randint(0, 10**6, (1,), generator=generator))
        cases += [(6, 3, torch.tensor([0.5, 0.1]), 0.8 ** torch.arange(6.0), True, True, 200, 128, 1e-2, seed),
                  (4, 2, torch.tensor([1.0, 0.2, 0.05]), torch.tensor([0.02, 1.0, 0.2, 0.05]), True, False, 150, 64, 1e-2,
                   seed + 1)]
    return cases


@exercise("07", "7.4", "train_toy_models", "Train many toy models at once", points=3,
          reference=_sup.train_toy_models)
def train_toy_models(answer, hidden):
    expect_callable(answer, "train_toy_models")
    for i, (n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed) in enumerate(_training_cases(hidden)):
        n_inst = p.shape[0]
        what = (f"case {i} ({n_inst} instances of {n} features in {m} dimensions, output_relu={output_relu}, "
                f"hidden_relu={hidden_relu}, {steps} steps, seed {seed})")
        got = answer(n, m, p.clone(), importance.clone(), output_relu, hidden_relu, steps, batch, lr, seed)
        if not isinstance(got, dict) or not {"W", "b_final"} <= set(got):
            raise CheckFailed(f"{what}: return a dict with 'W' and 'b_final', got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        for name, shape in (("W", (n_inst, m, n)), ("b_final", (n_inst, n))):
            if not isinstance(got[name], torch.Tensor) or tuple(got[name].shape) != shape:
                raise CheckFailed(f"{what}: {name} should have shape {shape}, got {_shape_of(got[name])}.")
        model = {name: got[name].detach().float() for name in ("W", "b_final")}
        reference = _sup.train_toy_models(n, m, p, importance, output_relu, hidden_relu, steps, batch, lr, seed)
        init_W, init_b = _sup.init_toy_weights(n_inst, n, m, seed)
        losses = {name: _sup.evaluate_toy_models(weights, p, importance, output_relu, hidden_relu)
                  for name, weights in (("yours", model), ("reference", reference),
                                        ("untrained", {"W": init_W, "b_final": init_b}))}
        yours, ref, init = (float(losses[name].mean()) for name in ("yours", "reference", "untrained"))
        if m == 1 and (p == 1).all() and not output_relu:  # linear, one dimension, dense: the most important wins
            top = int(torch.as_tensor(importance).argmax())
            winners = model["W"].norm(dim=1).argmax(-1)
            if (winners != top).any():
                raise CheckFailed(f"{what}: with dense features and one dimension the model should keep the most "
                                  f"important feature ({top}), but {int((winners != top).sum())} of {n_inst} "
                                  f"instances kept another: does your loss weigh each feature by its importance?")
        if yours > init - 0.6 * (init - ref):
            if yours > init:
                raise CheckFailed(f"{what}: your models' held-out loss ({yours:.4f}) is worse than untrained "
                                  f"({init:.4f}); do you minimise the loss (zero_grad, backward, step each step)?")
            raise CheckFailed(f"{what}: your models reach a held-out loss of {yours:.4f}; the reference's reach "
                              f"{ref:.4f} (untrained {init:.4f}). Does every step draw a fresh batch, do both W and "
                              f"b_final train, is the loss summed over instances, is the learning rate used?")
        again = answer(n, m, p.clone(), importance.clone(), output_relu, hidden_relu, steps, batch, lr, seed)
        if not all(torch.allclose(again[name].detach().float(), model[name], atol=1e-6) for name in model):
            raise CheckFailed(f"{what}: two runs with the same seed gave different models. Initialise with "
                              f"init_toy_weights(..., seed) and draw batches with generate_batch(..., seed=...), "
                              f"never from the global random state.")
    return f"{len(_training_cases(hidden))} trainings"


# ---------------------------------------------------------------------------------------------------------
# 7.5 — angles (the pentagon)
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.5", "feature_angles", "Where each feature points, in 2D", points=1, reference=_sup.feature_angles)
def feature_angles(answer, hidden):
    expect_callable(answer, "feature_angles")
    generator = torch.Generator().manual_seed(75)
    square = torch.tensor([[[1.0, 0.0, -1.0, 0.0, 0.7], [0.0, 1.0, 0.0, -1.0, -0.7]]])
    cases = [square, random_weights(3, 2, 5, generator), random_weights(2, 2, 7, generator)]
    if hidden:
        generator = hidden_generator(75)
        cases += [random_weights(4, 2, 6, generator), random_weights(1, 2, 9, generator)]
    for i, W in enumerate(cases):
        what = f"case {i} (W {tuple(W.shape)})"
        got = answer(W.clone())
        expected = _sup.feature_angles(W)
        if _close(got, expected, atol=1e-3):
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} [n_inst, n], got {_shape_of(got)}; "
                              f"the feature directions are the columns W[k, :, i].")
        radians = torch.deg2rad(expected)
        if _close(got % (2 * math.pi), radians, atol=1e-3):
            raise CheckFailed(f"{what}: your angles are in radians; return degrees.")
        if _close(got, torch.rad2deg(torch.atan2(W[:, 1], W[:, 0])), atol=1e-3):
            raise CheckFailed(f"{what}: some angles are negative; return them in [0, 360) (take them modulo 360).")
        if _close(got % 360, torch.rad2deg(torch.atan2(W[:, 0], W[:, 1])) % 360, atol=1e-3):
            raise CheckFailed(f"{what}: you swapped the coordinates: the angle is atan2(y, x) with x = W[:, 0], "
                              f"y = W[:, 1].")
        expect_tensor(got, expected, what, atol=1e-3, hint="atan2 of the second coordinate over the first, in degrees.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.6 — norms, interference, features per dimension
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.6", "superposition_stats", "Which features are represented, and how much they interfere",
          points=3, reference=_sup.superposition_stats)
def superposition_stats(answer, hidden):
    expect_callable(answer, "superposition_stats")
    generator = torch.Generator().manual_seed(76)
    cases = [(random_weights(3, 2, 5, generator, zero_feature=True), 0.5), (random_weights(2, 4, 7, generator), 0.5),
             (random_weights(2, 3, 6, generator), 0.8)]
    if hidden:
        generator = hidden_generator(76)
        cases += [(random_weights(4, 3, 8, generator, zero_feature=True), 0.5), (random_weights(3, 5, 11, generator), 0.3)]
    for i, (W, threshold) in enumerate(cases):
        n_inst, m, n = W.shape
        what = f"case {i} (W {tuple(W.shape)}, threshold {threshold})"
        got = answer(W.clone(), threshold)
        expected = _sup.superposition_stats(W, threshold)
        if not isinstance(got, dict) or not set(expected) <= set(got):
            raise CheckFailed(f"{what}: return a dict with the keys {sorted(expected)}, got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        norms = got["norms"]
        if not _close(norms, expected["norms"]):
            if isinstance(norms, torch.Tensor) and tuple(norms.shape) == (n_inst, m):
                raise CheckFailed(f"{what}: 'norms' has shape {(n_inst, m)}: you took the norms of the rows. A "
                                  f"feature's direction is a column W[k, :, i]: take the norm over dim 1.")
            expect_tensor(norms, expected["norms"], f"{what}, 'norms'", hint="W.norm(dim=1), [n_inst, n].")
        interference = got["interference"]
        if isinstance(interference, torch.Tensor) and torch.isnan(interference).any():
            raise CheckFailed(f"{what}: 'interference' has NaN for a feature whose W_i is zero (0 / 0); clamp the "
                              f"norm before dividing, and report 0 for that feature.")
        if not _close(interference, expected["interference"]):
            unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
            full = torch.einsum("kmi,kmj->kij", unit, W).pow(2).sum(-1)
            plain = torch.einsum("kmi,kmj->kij", W, W).pow(2)
            cosine = torch.einsum("kmi,kmj->kij", unit, unit).pow(2)
            off = 1 - torch.eye(n)
            if _close(interference, full, atol=1e-4):
                raise CheckFailed(f"{what}: your interference includes j = i (which adds ‖W_i‖²); sum over the "
                                  f"other features only.")
            if _close(interference, (plain * off).sum(-1), atol=1e-4):
                raise CheckFailed(f"{what}: you summed (W_i·W_j)²; normalise W_i first: (Ŵ_i·W_j)², so a feature's "
                                  f"own length does not count as interference.")
            if _close(interference, (cosine * off).sum(-1), atol=1e-4):
                raise CheckFailed(f"{what}: you normalised W_j too; only W_i is normalised: (Ŵ_i·W_j)², so long "
                                  f"neighbours interfere more.")
            expect_tensor(interference, expected["interference"], f"{what}, 'interference'", atol=1e-4)
        count = got["n_represented"]
        if not isinstance(count, torch.Tensor) or count.dtype.is_floating_point or not torch.equal(
                count.long(), expected["n_represented"]):
            raise CheckFailed(f"{what}: 'n_represented' should be an integer tensor [n_inst] "
                              f"{expected['n_represented'].tolist()} (features with norm > threshold), got "
                              f"{count.tolist() if isinstance(count, torch.Tensor) else count}.")
        per_dimension = got["features_per_dimension"]
        if not _close(per_dimension, expected["features_per_dimension"], atol=1e-4):
            frobenius = W.pow(2).sum((1, 2))
            if _close(per_dimension, frobenius / n, atol=1e-4):
                raise CheckFailed(f"{what}: 'features_per_dimension' divides by n; divide ‖W‖_F² by m, the number "
                                  f"of hidden dimensions.")
            if _close(per_dimension, frobenius.sqrt() / m, atol=1e-4):
                raise CheckFailed(f"{what}: use the squared Frobenius norm ‖W‖_F² (the sum of W's squared "
                                  f"entries), not ‖W‖_F.")
            expect_tensor(per_dimension, expected["features_per_dimension"], f"{what}, 'features_per_dimension'",
                          atol=1e-4)
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.7 — feature dimensionality
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.7", "feature_dimensionality", "Feature dimensionality", points=2,
          reference=_sup.feature_dimensionality)
def feature_dimensionality(answer, hidden):
    expect_callable(answer, "feature_dimensionality")
    generator = torch.Generator().manual_seed(77)
    pentagon = torch.stack([torch.cos(torch.arange(5) * 2 * math.pi / 5), torch.sin(torch.arange(5) * 2 * math.pi / 5)])
    cases = [pentagon[None], random_weights(3, 2, 5, generator, zero_feature=True), random_weights(2, 4, 9, generator)]
    if hidden:
        generator = hidden_generator(77)
        cases += [random_weights(3, 3, 7, generator, zero_feature=True), random_weights(2, 5, 12, generator)]
    for i, W in enumerate(cases):
        what = f"case {i} (W {tuple(W.shape)})"
        got = answer(W.clone())
        expected = _sup.feature_dimensionality(W)
        if _close(got, expected, atol=1e-4):
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} [n_inst, n], got {_shape_of(got)}.")
        if torch.isnan(got).any():
            raise CheckFailed(f"{what}: NaN for a feature whose W_i is zero; its dimensionality is 0.")
        norms = W.norm(dim=1)
        unit = W / norms.clamp_min(1e-8)[:, None]
        dots = torch.einsum("kmi,kmj->kij", unit, W)
        safe = lambda value: torch.where(norms > 1e-8, value, torch.zeros_like(value))  # noqa: E731
        if _close(got, safe(norms.pow(2) / (dots.pow(2) * (1 - torch.eye(W.shape[2]))).sum(-1).clamp_min(1e-8)),
                  atol=1e-4):
            raise CheckFailed(f"{what}: your denominator leaves out j = i; sum (Ŵ_i·W_j)² over every j, i "
                              f"included, so a feature alone in its dimension has D = 1.")
        if _close(got, safe(norms / dots.pow(2).sum(-1).clamp_min(1e-8)), atol=1e-4):
            raise CheckFailed(f"{what}: the numerator is ‖W_i‖², squared.")
        if _close(got, safe(norms.pow(2) / dots.abs().sum(-1).clamp_min(1e-8)), atol=1e-4):
            raise CheckFailed(f"{what}: square the overlaps in the denominator: Σ_j (Ŵ_i·W_j)².")
        expect_tensor(got, expected, what, atol=1e-4, hint="D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²; a pentagon gives 2/5.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.8 — plateaus of the dimensionality
# ---------------------------------------------------------------------------------------------------------


def _plateau_case(n_inst: int, n: int, generator: torch.Generator, jitter: float):
    values = torch.tensor(list(_sup.PLATEAUS.values()) + [0.3, 0.9, 0.55, 0.25])
    D = values[torch.randint(0, len(values), (n_inst, n), generator=generator)]
    D = D + jitter * (2 * torch.rand(n_inst, n, generator=generator) - 1)
    norms = 0.2 + torch.rand(n_inst, n, generator=generator)
    return D, norms


@exercise("07", "7.8", "plateau_counts", "Count the features on each plateau", points=2,
          reference=_sup.plateau_counts)
def plateau_counts(answer, hidden):
    expect_callable(answer, "plateau_counts")
    generator = torch.Generator().manual_seed(79)
    D0, norms0 = _plateau_case(4, 10, generator, 0.02)
    D0[0, :3] = torch.tensor([0.385, 0.39, 0.392])  # within 0.03 of both 2/5 and 3/8: the nearest one counts
    norms0[0, :3] = 1.0
    cases = [(D0, norms0, 0.5, 0.03), (*_plateau_case(3, 8, generator, 0.01), 0.5, 0.015)]
    if hidden:
        generator = hidden_generator(79)
        cases += [(*_plateau_case(5, 12, generator, 0.03), 0.4, 0.02), (*_plateau_case(2, 20, generator, 0.05), 0.7, 0.04)]
    for i, (D, norms, threshold, tolerance) in enumerate(cases):
        what = f"case {i} (D {tuple(D.shape)}, threshold {threshold}, tolerance {tolerance})"
        got = answer(D.clone(), norms.clone(), threshold, tolerance)
        expected = _sup.plateau_counts(D, norms, threshold, tolerance)
        if not isinstance(got, dict) or set(got) != set(expected):
            raise CheckFailed(f"{what}: return a dict with the keys {list(expected)}, got "
                              f"{list(got) if isinstance(got, dict) else type(got).__name__}.")
        try:
            got = {key: int(value) for key, value in got.items()}
        except (TypeError, ValueError):
            raise CheckFailed(f"{what}: every value should be a count (an int).") from None
        if got == expected:
            continue
        everyone = _sup.plateau_counts(D, torch.ones_like(norms), 0.5, tolerance)
        if got == everyone:
            raise CheckFailed(f"{what}: you counted every feature; count only the represented ones (norm > "
                              f"threshold): a dropped feature's D means nothing.")
        if got["represented"] != expected["represented"]:
            raise CheckFailed(f"{what}: 'represented' is {got['represented']}, expected {expected['represented']} "
                              f"(features with norm > threshold).")
        if sum(got[name] for name in _sup.PLATEAUS) > sum(expected[name] for name in _sup.PLATEAUS):
            raise CheckFailed(f"{what}: some features are counted on two plateaus (2/5 and 3/8 are 0.025 apart); "
                              f"give each feature to its nearest plateau only, if it lies within the tolerance. "
                              f"Yours {got}, expected {expected}.")
        raise CheckFailed(f"{what}: yours {got}, expected {expected}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.9 — phases of the n = 2, m = 1 model
# ---------------------------------------------------------------------------------------------------------


def _phase_weights(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


@exercise("07", "7.9", "classify_phases", "The phase of a two-feature, one-dimension model", points=2,
          reference=_sup.classify_phases)
def classify_phases(answer, hidden):
    expect_callable(answer, "classify_phases")
    cases = [(_phase_weights([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [-0.9, 0.8], [0.9, 0.8], [0.1, -0.2]]), 0.5),
             (_phase_weights([[1.0, -0.6], [0.7, -0.7], [-1.1, 0.05], [0.2, -1.0]]), 0.65)]
    if hidden:
        generator = hidden_generator(78)
        cases += [((torch.rand(12, 1, 2, generator=generator) * 2.4 - 1.2), 0.5),
                  ((torch.rand(9, 1, 2, generator=generator) * 2.0 - 1.0), 0.3)]
    for i, (W, threshold) in enumerate(cases):
        what = f"case {i} ({W.shape[0]} instances, threshold {threshold})"
        got = answer(W.clone(), threshold)
        expected = _sup.classify_phases(W, threshold)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)} (one phase per instance), "
                              f"got {_shape_of(got)}.")
        if got.dtype.is_floating_point:
            raise CheckFailed(f"{what}: return integer phases (torch.long), indices into PHASES.")
        if torch.equal(got.long(), expected):
            continue
        wrong = int((got.long() != expected).nonzero()[0])
        w1, w2 = W[wrong, 0].tolist()
        told = f"instance {wrong} (w1 = {w1:.2f}, w2 = {w2:.2f}): yours {int(got[wrong])}, expected {int(expected[wrong])}"
        if expected[wrong] == 1 and got[wrong] == 2:
            raise CheckFailed(f"{what}, {told}: both features point the same way; superposition in one dimension "
                              f"is an antipodal pair, so their signs must be opposite.")
        if expected[wrong] == 1 and got[wrong] == 0 and w2 < 0:
            raise CheckFailed(f"{what}, {told}: a feature with a large negative weight is represented too; compare "
                              f"|w| with the threshold.")
        if expected[wrong] == 0 and got[wrong] == 1:
            raise CheckFailed(f"{what}, {told}: phase 1 means feature 2 (the second one) has the dimension; here "
                              f"|w2| <= threshold, so feature 2 is not represented (0).")
        raise CheckFailed(f"{what}, {told}. Phases: 0 feature 2 not represented, 1 feature 2 represented without "
                          f"an antipodal partner, 2 both represented with opposite signs.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.10 — polysemantic neurons
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.10", "neuron_feature_counts", "How many features each neuron serves", points=1,
          reference=_sup.neuron_feature_counts)
def neuron_feature_counts(answer, hidden):
    expect_callable(answer, "neuron_feature_counts")
    generator = torch.Generator().manual_seed(710)
    cases = [(torch.randn(3, 4, 7, generator=generator) * 0.6, 0.3), (torch.randn(2, 3, 5, generator=generator), 0.5)]
    if hidden:
        generator = hidden_generator(710)
        cases += [(torch.randn(4, 5, 9, generator=generator) * 0.6, 0.3), (torch.randn(2, 2, 6, generator=generator), 0.2)]
    for i, (W, threshold) in enumerate(cases):
        n_inst, m, n = W.shape
        what = f"case {i} (W {tuple(W.shape)}, threshold {threshold})"
        got = answer(W.clone(), threshold)
        expected = _sup.neuron_feature_counts(W, threshold)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n_inst, n):
            raise CheckFailed(f"{what}: your counts have shape {(n_inst, n)}, one per feature; count per neuron "
                              f"(the m rows of W), over the features (dim -1).")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} [n_inst, m], got {_shape_of(got)}.")
        if torch.equal(got.long(), expected):
            continue
        if torch.equal(got.long(), (W.abs() > threshold).sum(-1)):
            raise CheckFailed(f"{what}: you counted negative weights too; a feature with a negative weight only "
                              f"keeps the ReLU neuron off, it does not make it fire. Count W > threshold.")
        expect_tensor(got.long(), expected, what, hint="count, for each neuron, the features whose weight into it "
                                                      "exceeds the threshold.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 7.11 — does an SAE recover the features?
# ---------------------------------------------------------------------------------------------------------


@exercise("07", "7.11", "max_cosine_similarity", "Match SAE latents to the true features", points=1,
          reference=_sup.max_cosine_similarity)
def max_cosine_similarity(answer, hidden):
    expect_callable(answer, "max_cosine_similarity")
    generator = torch.Generator().manual_seed(711)
    cases = [(torch.randn(12, 5, generator=generator) * 2, torch.randn(8, 5, generator=generator) * 0.7),
             (torch.randn(6, 3, generator=generator), torch.randn(4, 3, generator=generator) * 3)]
    if hidden:
        generator = hidden_generator(711)
        cases += [(torch.randn(15, 4, generator=generator) * 1.5, torch.randn(9, 4, generator=generator)),
                  (torch.randn(7, 6, generator=generator), torch.randn(10, 6, generator=generator) * 0.5)]
    for i, (W_dec, features) in enumerate(cases):
        what = f"case {i} (W_dec {tuple(W_dec.shape)}, features {tuple(features.shape)})"
        got = answer(W_dec.clone(), features.clone())
        best, index = _sup.max_cosine_similarity(W_dec, features)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return a pair (best cosine similarity, index of that latent), got "
                              f"{type(got).__name__}.")
        got_best, got_index = got
        if isinstance(got_best, torch.Tensor) and tuple(got_best.shape) == (W_dec.shape[0],) != tuple(best.shape):
            raise CheckFailed(f"{what}: you returned one value per SAE latent; return one per true feature (the "
                              f"best latent for each feature: max over the latents).")
        if not _close(got_best, best, atol=1e-4):
            if isinstance(got_best, torch.Tensor) and got_best.shape == best.shape:
                if _close(got_best, (features @ W_dec.T).max(-1).values, atol=1e-4):
                    raise CheckFailed(f"{what}: you took dot products; normalise both sets of directions first "
                                      f"(cosine similarity).")
                unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
                if _close(got_best, (unit(features) @ unit(W_dec).T).abs().max(-1).values, atol=1e-4):
                    raise CheckFailed(f"{what}: you took |cos|; a latent pointing the opposite way does not "
                                      f"represent the feature (SAE activations are non-negative). Keep the sign.")
            expect_tensor(got_best, best, f"{what}, best cosine", atol=1e-4)
        if not isinstance(got_index, torch.Tensor) or got_index.dtype.is_floating_point or \
                not torch.equal(got_index.long(), index):
            raise CheckFailed(f"{what}: the indices (long, [n_true]) should be {index.tolist()}, got "
                              f"{got_index.tolist() if isinstance(got_index, torch.Tensor) else got_index}.")
    return f"{len(cases)} cases"
