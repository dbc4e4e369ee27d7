"""Toy models of superposition (Elhage et al. 2022), many small models trained at once.

A batch of `n_inst` independent toy models ("instances") shares one set of tensors: W [n_inst, m, n] maps n
features into m hidden dimensions, b_final [n_inst, n]. Instance k sees its own data (its own feature
probabilities and importances) and its loss only touches its own slice of the weights, so one Adam optimiser
trains all of them at once.

    x = generate_batch(n_inst, n, batch_size, feature_probability, seed)     # [batch, n_inst, n]
    out = toy_forward(W, b_final, x, output_relu=True)                        # ReLU(Wᵀ W x + b)
    loss = weighted_mse(out, x, importance)                                   # [n_inst]
    model = train_toy_models(n, m, feature_probability, importance, ...)      # {"W", "b_final"}
    stats = superposition_stats(model["W"])                                   # norms, interference, ...

The metrics read W alone: the column W[k, :, i] is the direction instance k gives feature i in its hidden space.
"""

from __future__ import annotations

import math

import torch

PLATEAUS = {"1": 1.0, "3/4": 3 / 4, "2/3": 2 / 3, "1/2": 1 / 2, "2/5": 2 / 5, "3/8": 3 / 8}  # paper, fig. "dimensionality"
PHASES = ("not represented", "dedicated dimension", "superposition")  # for feature 2 of the n = 2, m = 1 model
EPS = 1e-8


def _per_instance(value, n_inst: int, n_features: int, what: str) -> torch.Tensor:
    """A float, [n_inst], [n_features] (importance only) or [n_inst, n_features] value as [n_inst, n_features]."""
    value = torch.as_tensor(value, dtype=torch.float32)
    if value.ndim == 0:
        return value.expand(n_inst, n_features)
    if value.ndim == 1 and value.shape[0] == n_inst:
        return value[:, None].expand(n_inst, n_features)
    if value.ndim == 1 and value.shape[0] == n_features:
        return value[None, :].expand(n_inst, n_features)
    if value.ndim == 2 and tuple(value.shape) == (n_inst, n_features):
        return value
    raise ValueError(f"{what} has shape {tuple(value.shape)}; expected a number, [n_inst = {n_inst}], "
                     f"[n_features = {n_features}] or [n_inst, n_features]")


def generate_batch(n_inst: int, n_features: int, batch_size: int, feature_probability, seed: int) -> torch.Tensor:
    """Sparse synthetic features [batch_size, n_inst, n_features]: each feature is present independently with
    its instance's probability, and a present feature takes a value uniform in [0, 1].

    Drawn from torch.Generator().manual_seed(seed): first the values (torch.rand), then the mask (torch.rand <
    probability), both of shape [batch_size, n_inst, n_features]."""
    p = _per_instance(feature_probability, n_inst, n_features, "feature_probability")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("feature_probability must lie in [0, 1]")
    generator = torch.Generator().manual_seed(int(seed))
    values = torch.rand(batch_size, n_inst, n_features, generator=generator)
    present = torch.rand(batch_size, n_inst, n_features, generator=generator) < p
    return values * present


def toy_forward(W: torch.Tensor, b_final: torch.Tensor, x: torch.Tensor, output_relu: bool = True,
                hidden_relu: bool = False) -> torch.Tensor:
    """x [batch, n_inst, n] -> out [batch, n_inst, n]: h = W x (ReLU'd if hidden_relu), out = Wᵀ h + b_final
    (ReLU'd if output_relu). W [n_inst, m, n], b_final [n_inst, n]."""
    if W.ndim != 3 or x.shape[-2:] != (W.shape[0], W.shape[2]):
        raise ValueError(f"W {tuple(W.shape)} and x {tuple(x.shape)} do not match: W is [n_inst, m, n], x [batch, "
                         f"n_inst, n]")
    hidden = torch.einsum("imn,bin->bim", W, x)
    if hidden_relu:
        hidden = hidden.relu()
    out = torch.einsum("imn,bim->bin", W, hidden) + b_final
    return out.relu() if output_relu else out


def weighted_mse(out: torch.Tensor, x: torch.Tensor, importance) -> torch.Tensor:
    """Per-instance loss [n_inst]: the mean over the batch of Σ_i I_i (x_i - out_i)², importance I [n] or
    [n_inst, n]."""
    importance = _per_instance(importance, x.shape[1], x.shape[2], "importance").to(x.dtype)
    return (importance * (x - out).pow(2)).sum(-1).mean(0)


def init_toy_weights(n_inst: int, n_features: int, d_hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [n_inst, m, n] with Xavier-normal entries (std sqrt(2 / (m + n))) from torch.Generator().manual_seed(seed),
    and b_final [n_inst, n] of zeros."""
    generator = torch.Generator().manual_seed(int(seed))
    std = math.sqrt(2.0 / (n_features + d_hidden))
    W = torch.randn(n_inst, d_hidden, n_features, generator=generator) * std
    return W, torch.zeros(n_inst, n_features)


def train_toy_models(n_features: int, d_hidden: int, feature_probability, importance, output_relu: bool = True,
                     hidden_relu: bool = False, steps: int = 3000, batch_size: int = 1024, lr: float = 1e-2,
                     seed: int = 0) -> dict:
    """Train n_inst toy models at once, n_inst = feature_probability.shape[0]; return {"W", "b_final"} (detached).

    Weights from init_toy_weights(n_inst, n_features, d_hidden, seed); step t trains on
    generate_batch(..., seed=seed * 1_000_003 + t + 1) with Adam (lr, decayed with a cosine to 0 by the last
    step) on the sum over instances of weighted_mse (each instance's gradient only reaches its own weights)."""
    feature_probability = torch.as_tensor(feature_probability, dtype=torch.float32)
    if feature_probability.ndim not in (1, 2):
        raise ValueError("feature_probability must be [n_inst] or [n_inst, n_features]")
    n_inst = feature_probability.shape[0]
    W, b_final = init_toy_weights(n_inst, n_features, d_hidden, seed)
    W.requires_grad_(True)
    b_final.requires_grad_(True)
    optimiser = torch.optim.Adam([W, b_final], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            for group in optimiser.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x = generate_batch(n_inst, n_features, batch_size, feature_probability, seed * 1_000_003 + step + 1)
            loss = weighted_mse(toy_forward(W, b_final, x, output_relu, hidden_relu), x, importance).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return {"W": W.detach(), "b_final": b_final.detach()}


def evaluate_toy_models(model: dict, feature_probability, importance, output_relu: bool = True,
                        hidden_relu: bool = False, batch_size: int = 8192, seed: int = 12345) -> torch.Tensor:
    """The per-instance loss [n_inst] of trained models on a fresh batch."""
    W = model["W"]
    x = generate_batch(W.shape[0], W.shape[2], batch_size, feature_probability, seed)
    with torch.no_grad():
        return weighted_mse(toy_forward(W, model["b_final"], x, output_relu, hidden_relu), x, importance)


# ---------------------------------------------------------------------------------------------------------
# Reading the weights
# ---------------------------------------------------------------------------------------------------------


def feature_angles(W: torch.Tensor) -> torch.Tensor:
    """For m = 2: the angle of each feature's direction W[k, :, i] in degrees, in [0, 360); [n_inst, n]."""
    if W.ndim != 3 or W.shape[1] != 2:
        raise ValueError(f"feature_angles needs W [n_inst, 2, n], got {tuple(W.shape)}")
    return torch.rad2deg(torch.atan2(W[:, 1], W[:, 0])) % 360


def superposition_stats(W: torch.Tensor, threshold: float = 0.5) -> dict:
    """What the paper's sparsity figure shows, per instance:
    "norms" [n_inst, n] ‖W_i‖; "interference" [n_inst, n] Σ_{j≠i} (Ŵ_i·W_j)² (0 for a zero W_i);
    "n_represented" [n_inst] (long) features with ‖W_i‖ > threshold; "features_per_dimension" [n_inst] ‖W‖_F² / m.
    """
    if W.ndim != 3:
        raise ValueError(f"W must be [n_inst, m, n], got {tuple(W.shape)}")
    norms = W.norm(dim=1)  # [n_inst, n]: column norms (feature directions are columns)
    unit = W / norms.clamp_min(EPS)[:, None, :]
    overlaps = torch.einsum("kmi,kmj->kij", unit, W)  # [n_inst, n, n]: Ŵ_i · W_j
    overlaps = overlaps * (1 - torch.eye(W.shape[2]))  # drop j = i
    interference = overlaps.pow(2).sum(-1)
    interference = torch.where(norms > EPS, interference, torch.zeros_like(interference))
    n_represented = (norms > threshold).sum(-1)
    features_per_dimension = W.pow(2).sum((1, 2)) / W.shape[1]
    return {"norms": norms, "interference": interference, "n_represented": n_represented,
            "features_per_dimension": features_per_dimension}


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)² (the sum includes j = i), [n_inst, n]; 0 for a feature with W_i = 0."""
    norms = W.norm(dim=1)
    unit = W / norms.clamp_min(EPS)[:, None, :]
    denominator = torch.einsum("kmi,kmj->kij", unit, W).pow(2).sum(-1)
    return torch.where(norms > EPS, norms.pow(2) / denominator.clamp_min(EPS), torch.zeros_like(norms))


def classify_phases(W: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """For n = 2 features in m = 1 dimension: the phase of each instance [n_inst] (long), indexing PHASES:
    0 "not represented" (‖W_2‖ <= threshold: the extra feature 2 is dropped), 1 "dedicated dimension" (feature 2
    is represented, feature 1 is not, or both point the same way), 2 "superposition" (both represented, opposite
    signs: the antipodal pair)."""
    if W.ndim != 3 or W.shape[1:] != (1, 2):
        raise ValueError(f"classify_phases needs W [n_inst, 1, 2], got {tuple(W.shape)}")
    w1, w2 = W[:, 0, 0], W[:, 0, 1]
    represented_1, represented_2 = w1.abs() > threshold, w2.abs() > threshold
    antipodal = represented_1 & represented_2 & (w1 * w2 < 0)
    phase = torch.zeros(W.shape[0], dtype=torch.long)
    phase[represented_2] = 1
    phase[antipodal] = 2
    return phase


def plateau_counts(dimensionality: torch.Tensor, norms: torch.Tensor, threshold: float = 0.5,
                   tolerance: float = 0.03) -> dict:
    """How many represented features (norm > threshold) sit on each of the paper's plateaus: a dict from each
    name in PLATEAUS to the number of features whose D lies within `tolerance` of it (nearest plateau only), plus
    "other" (represented, on no plateau) and "represented" (the total)."""
    D = dimensionality[norms > threshold].flatten()
    values = torch.tensor(list(PLATEAUS.values()))
    distance = (D[:, None] - values[None, :]).abs()
    nearest = distance.argmin(-1)
    on_plateau = distance.min(-1).values <= tolerance
    counts = {name: int(((nearest == index) & on_plateau).sum()) for index, name in enumerate(PLATEAUS)}
    counts["other"] = int((~on_plateau).sum())
    counts["represented"] = int(D.numel())
    return counts


def neuron_feature_counts(W: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """For a model with a ReLU hidden layer: how many features each neuron serves, [n_inst, m] (long).
    Feature i drives neuron k when W[., k, i] > threshold (a negative weight only silences a ReLU neuron)."""
    if W.ndim != 3:
        raise ValueError(f"W must be [n_inst, m, n], got {tuple(W.shape)}")
    return (W > threshold).sum(-1)


def max_cosine_similarity(W_dec: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true feature direction (rows of features [n_true, d]), the best cosine similarity with any SAE
    decoder row (W_dec [d_sae, d]) and that latent's index: ([n_true] float, [n_true] long)."""
    if W_dec.shape[-1] != features.shape[-1]:
        raise ValueError(f"W_dec {tuple(W_dec.shape)} and features {tuple(features.shape)} live in different spaces")
    decoder = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS)
    true = features / features.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cosines = true @ decoder.T  # [n_true, d_sae]
    best = cosines.max(-1)
    return best.values, best.indices
