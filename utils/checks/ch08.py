"""Checks for chapter 08 — Sparse autoencoders and clamping a feature.

References come from `utils.sae` (the SAE, its training loop, metrics, splicing and clamping) and
`utils.dashboards` (a latent's page). Every check calls the learner's function on small cases (random SAEs of a
few dozen latents, synthetic activations, two short prompts) and, when it is wrong, compares it with the usual
mistakes to say which one.
"""

from __future__ import annotations

import math

import torch

from utils import dashboards as _dash
from utils import sae as _sae
from utils.course.checking import CheckFailed, as_number, exercise, expect_callable, expect_tensor
from utils.models import model_for_checks


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.detach().to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def random_sae(d_in: int, d_sae: int, seed: int, unit_decoder: bool = False) -> dict:
    """A random SAE whose latents fire on random inputs: decoder rows of varied norms (unless unit_decoder),
    a non-zero b_dec and b_enc, so that every term of the forward pass matters."""
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    if not unit_decoder:
        W_dec = W_dec * (0.5 + torch.rand(d_sae, 1, generator=generator))
    return {"W_enc": torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in),
            "b_enc": 0.1 * torch.randn(d_sae, generator=generator),
            "W_dec": W_dec, "b_dec": 0.5 * torch.randn(d_in, generator=generator)}


def _copy_params(params: dict) -> dict:
    return {name: tensor.clone() for name, tensor in params.items()}


# ---------------------------------------------------------------------------------------------------------
# 8.1 — TopK
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.1", "topk_activation", "The TopK activation", points=1, reference=_sae.topk_activation)
def topk_activation(answer, hidden):
    expect_callable(answer, "topk_activation")
    generator = torch.Generator().manual_seed(81)
    few_positive = torch.randn(3, 9, generator=generator) - 1.5  # most rows have fewer than k positive entries
    cases = [(torch.randn(5, 12, generator=generator), 3), (few_positive, 4),
             (torch.randn(2, 3, 7, generator=generator), 2)]
    if hidden:
        cases += [(torch.randn(4, 33, generator=generator), 5), (torch.randn(6, 10, generator=generator) + 0.5, 1)]
    for i, (pre, k) in enumerate(cases):
        what = f"case {i} (pre-activations {tuple(pre.shape)}, k = {k})"
        original = pre.clone()
        got = answer(pre, k)
        if not torch.equal(pre, original):
            raise CheckFailed(f"{what}: your function changed its input in place; build a new tensor.")
        expected = _sae.topk_activation(pre, k)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected a tensor of the input's shape {tuple(expected.shape)}, got "
                              f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.")
        if _close(got, expected, atol=1e-6):
            continue
        if (got < 0).any():
            raise CheckFailed(f"{what}: your output has negative entries. Apply ReLU to the k values you keep: "
                              f"a latent whose pre-activation is among the top k but negative stays at 0.")
        if _close(got, torch.zeros_like(pre).scatter(-1, pre.topk(k, dim=-1).indices, pre.topk(k, dim=-1).values),
                  atol=1e-6):
            raise CheckFailed(f"{what}: close, but negative top-k values must become 0 (ReLU).")
        nonzero = (got != 0).sum(-1)
        if pre.ndim >= 2 and pre.shape[0] > k and _close(got, _sae.topk_activation(pre.transpose(0, -1), k)
                                                         .transpose(0, -1), atol=1e-6):
            raise CheckFailed(f"{what}: you kept the top k along the wrong dimension; keep the k largest of each "
                              f"row, i.e. along the last dimension (the latents).")
        if (nonzero > k).any():
            raise CheckFailed(f"{what}: some rows keep {int(nonzero.max())} non-zero latents, more than k = {k}.")
        if _close(got, (-_sae.topk_activation(-pre, k)).relu(), atol=1e-6):
            raise CheckFailed(f"{what}: you kept the k smallest values; keep the k largest.")
        expect_tensor(got, expected, what, atol=1e-6,
                      hint="keep the k largest entries of each row (after ReLU), zero everywhere else.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.2 — the forward pass
# ---------------------------------------------------------------------------------------------------------


def _forward_cases(hidden: bool):
    generator = torch.Generator().manual_seed(82)
    cases = [(torch.randn(6, 10, generator=generator) + 1.0, random_sae(10, 24, 0), "standard", None),
             (torch.randn(6, 10, generator=generator) + 1.0, random_sae(10, 24, 1), "topk", 3),
             (torch.randn(2, 5, 10, generator=generator), random_sae(10, 24, 2), "topk", 4)]
    if hidden:
        cases += [(torch.randn(7, 13, generator=generator) - 0.5, random_sae(13, 40, 3), "standard", None),
                  (torch.randn(3, 2, 13, generator=generator), random_sae(13, 40, 4), "topk", 6)]
    return cases


@exercise("08", "8.2", "sae_forward", "The SAE's forward pass", points=2, reference=_sae.sae_forward)
def sae_forward(answer, hidden):
    expect_callable(answer, "sae_forward")
    for i, (x, params, architecture, k) in enumerate(_forward_cases(hidden)):
        what = f"case {i} ({architecture}{f', k = {k}' if k else ''}, x {tuple(x.shape)})"
        got = answer(x.clone(), _copy_params(params), architecture, k)
        recon, acts = _sae.sae_forward(x, params, architecture, k)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return a pair (reconstruction, latent activations), got "
                              f"{type(got).__name__}.")
        got_recon, got_acts = got
        if _close(got_recon, acts) and _close(got_acts, recon):
            raise CheckFailed(f"{what}: you returned (activations, reconstruction); return (reconstruction, "
                              f"activations).")
        if isinstance(got_acts, torch.Tensor) and tuple(got_acts.shape) == tuple(recon.shape) != tuple(acts.shape):
            raise CheckFailed(f"{what}: the second element has shape {tuple(got_acts.shape)}, that of the "
                              f"reconstruction; return (reconstruction, activations).")
        if not _close(got_acts, acts, atol=1e-5):
            if isinstance(got_acts, torch.Tensor) and got_acts.shape == acts.shape:
                no_centre = _sae.encode(x + params["b_dec"], params, architecture, k)
                if _close(got_acts, no_centre, atol=1e-5):
                    raise CheckFailed(f"{what}: your activations ignore b_dec. The encoder reads x - b_dec "
                                      f"(SAELens's apply_b_dec_to_input): subtract b_dec before multiplying by W_enc.")
                no_bias = _sae.encode(x, {**params, "b_enc": torch.zeros_like(params["b_enc"])}, architecture, k)
                if _close(got_acts, no_bias, atol=1e-5):
                    raise CheckFailed(f"{what}: your activations ignore b_enc; add it before the activation.")
                if architecture == "topk" and _close(got_acts, _sae.encode(x, params, "standard"), atol=1e-5):
                    raise CheckFailed(f"{what}: with architecture 'topk' keep only the k largest pre-activations "
                                      f"(your activations are a plain ReLU).")
                if architecture == "standard" and (got_acts != 0).sum(-1).max() <= 8 and (acts != 0).sum(-1).max() > 8:
                    raise CheckFailed(f"{what}: architecture 'standard' is ReLU alone (no TopK); k is None there.")
            expect_tensor(got_acts, acts, f"{what}, activations", atol=1e-5,
                          hint="acts = activation((x - b_dec) @ W_enc + b_enc).")
        if isinstance(got_recon, torch.Tensor) and _close(got_recon, acts @ params["W_dec"], atol=1e-5):
            raise CheckFailed(f"{what}: your reconstruction lacks b_dec; decode as acts @ W_dec + b_dec.")
        expect_tensor(got_recon, recon, f"{what}, reconstruction", atol=1e-5, hint="recon = acts @ W_dec + b_dec.")
    return "standard and TopK"


# ---------------------------------------------------------------------------------------------------------
# 8.3 — the loss
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.3", "sae_loss", "The training loss: reconstruction + sparsity", points=2, reference=_sae.sae_loss)
def sae_loss(answer, hidden):
    expect_callable(answer, "sae_loss")
    cases = [(x, params, architecture, k, 0.3 if architecture == "standard" else 0.0)
             for x, params, architecture, k in _forward_cases(hidden)]
    cases.insert(1, (cases[0][0], cases[0][1], "standard", None, 0.05))
    for i, (x, params, architecture, k, l1) in enumerate(cases):
        x = x.reshape(-1, x.shape[-1])
        what = f"case {i} ({architecture}, l1_coefficient = {l1}, batch {x.shape[0]}, d_in {x.shape[1]})"
        got = answer(x.clone(), _copy_params(params), architecture, k, l1)
        expected = _sae.sae_loss(x, params, architecture, k, l1)
        if not isinstance(got, dict) or not {"mse", "l1", "loss"} <= set(got):
            raise CheckFailed(f"{what}: return a dict with the keys 'mse', 'l1' and 'loss', got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        values = {key: as_number(got[key], f"{what}, '{key}'") for key in ("mse", "l1", "loss")}
        recon, acts = _sae.sae_forward(x, params, architecture, k)
        mse, l1_value = float(expected["mse"]), float(expected["l1"])
        if abs(values["mse"] - mse) > 1e-4 * max(1.0, mse):
            if abs(values["mse"] - mse / x.shape[1]) < 1e-4 * max(1.0, mse):
                raise CheckFailed(f"{what}: your 'mse' is averaged over d_in too ({values['mse']:.4g}); sum the "
                                  f"squared error over d_in and average over the batch ({mse:.4g}).")
            if abs(values["mse"] - mse * x.shape[0]) < 1e-4 * max(1.0, mse * x.shape[0]):
                raise CheckFailed(f"{what}: your 'mse' is summed over the batch; average it over the batch.")
            raise CheckFailed(f"{what}: 'mse' is {values['mse']:.4g}, expected {mse:.4g} "
                              f"(((recon - x) ** 2).sum(-1).mean()).")
        if abs(values["l1"] - l1_value) > 1e-4 * max(1.0, l1_value):
            plain = float(acts.sum(-1).mean())
            if abs(values["l1"] - plain) < 1e-4 * max(1.0, plain):
                raise CheckFailed(f"{what}: your 'l1' ignores the decoder norms. Weight each latent's activation by "
                                  f"the norm of its decoder row (W_dec.norm(dim=-1)), or the SAE can shrink its "
                                  f"activations and grow W_dec to dodge the penalty.")
            if abs(values["l1"] - l1_value * x.shape[0]) < 1e-4 * max(1.0, l1_value * x.shape[0]):
                raise CheckFailed(f"{what}: your 'l1' is summed over the batch; average it over the batch.")
            raise CheckFailed(f"{what}: 'l1' is {values['l1']:.4g}, expected {l1_value:.4g}.")
        total = mse + l1 * l1_value
        if abs(values["loss"] - total) > 1e-4 * max(1.0, total):
            if abs(values["loss"] - (mse + l1_value)) < 1e-4 * max(1.0, total) and l1 != 1:
                raise CheckFailed(f"{what}: 'loss' adds the L1 term without l1_coefficient.")
            raise CheckFailed(f"{what}: 'loss' is {values['loss']:.4g}, expected mse + l1_coefficient * l1 = "
                              f"{total:.4g}.")
        if isinstance(got["loss"], torch.Tensor) and not got["loss"].requires_grad and any(
                p.requires_grad for p in params.values()):
            raise CheckFailed(f"{what}: 'loss' does not carry gradients; compute it with torch operations.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.4 — the training loop
# ---------------------------------------------------------------------------------------------------------


def synthetic_activations(n: int, d_in: int, n_features: int, per_token: int, seed: int,
                          sample_seed: int | None = None) -> torch.Tensor:
    """Activations built from planted sparse features: each row is an offset plus `per_token` random features
    (unit directions) with magnitudes in [1, 3]. `seed` fixes the features and the offset, `sample_seed` (default
    `seed`) which tokens are drawn. A good SAE recovers most of their variance."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    offset = 2 * torch.randn(d_in, generator=generator)
    if sample_seed is not None:
        generator = torch.Generator().manual_seed(sample_seed)
    chosen = torch.rand(n, n_features, generator=generator).topk(per_token, dim=-1).indices
    magnitudes = 1 + 2 * torch.rand(n, per_token, generator=generator)
    codes = torch.zeros(n, n_features).scatter(-1, chosen, magnitudes)
    return offset + codes @ directions


def _training_cases(hidden: bool):
    # (data seed, d_in, n_features, per token, d_sae, architecture, k, l1, steps, batch, lr, seed)
    cases = [(0, 16, 32, 3, 48, "topk", 3, 0.0, 400, 128, 3e-3, 0),
             (1, 16, 32, 3, 48, "standard", None, 1.0, 400, 128, 3e-3, 1)]
    if hidden:
        cases += [(2, 20, 40, 4, 64, "topk", 4, 0.0, 400, 96, 3e-3, 5)]
    return cases


def _fve(params, x, architecture, k) -> float:
    recon, _ = _sae.sae_forward(x, params, architecture, k)
    return float(_sae.fraction_variance_explained(x, recon))


@exercise("08", "8.4", "train_sae", "The training loop", points=3, reference=_sae.train_sae)
def train_sae(answer, hidden):
    expect_callable(answer, "train_sae")
    for i, (data_seed, d_in, n_features, per_token, d_sae, architecture, k, l1, steps, batch, lr, seed) in \
            enumerate(_training_cases(hidden)):
        what = f"case {i} ({architecture}, {d_in} -> {d_sae}, {steps} steps of {batch}, seed {seed})"
        data = synthetic_activations(4096, d_in, n_features, per_token, data_seed)
        held_out = synthetic_activations(1024, d_in, n_features, per_token, data_seed, sample_seed=data_seed + 100)
        original = data.clone()
        got = answer(data, d_sae, architecture, k, l1, steps, batch, lr, seed)
        if not torch.equal(data, original):
            raise CheckFailed(f"{what}: your loop changed the activations it was given; leave them as they are.")
        if not isinstance(got, dict) or not {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(got):
            raise CheckFailed(f"{what}: return the trained params, a dict with 'W_enc', 'b_enc', 'W_dec', 'b_dec'; "
                              f"got {sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in shapes.items():
            if not isinstance(got[name], torch.Tensor) or tuple(got[name].shape) != shape:
                raise CheckFailed(f"{what}: {name} should have shape {shape}, got "
                                  f"{tuple(got[name].shape) if isinstance(got[name], torch.Tensor) else got[name]}.")
        params = {name: got[name].detach().float() for name in shapes}
        norms = params["W_dec"].norm(dim=-1)
        if (norms - 1).abs().max() > 1e-3:
            raise CheckFailed(f"{what}: decoder rows have norms from {norms.min():.3f} to {norms.max():.3f}; rescale "
                              f"every row of W_dec to unit norm after each optimiser step (otherwise the L1 "
                              f"penalty and the latents' scale are not tied down).")
        reference = _sae.train_sae(data, d_sae, architecture, k, l1, steps, batch, lr, seed)
        got_fve, ref_fve = _fve(params, held_out, architecture, k), _fve(reference, held_out, architecture, k)
        init = _sae.init_sae(d_in, d_sae, seed, b_dec=data.mean(0))
        init_fve = _fve(init, held_out, architecture, k)
        if got_fve < init_fve + 0.5 * (ref_fve - init_fve):
            if got_fve < init_fve - 0.05:
                raise CheckFailed(f"{what}: your SAE explains {got_fve:.2f} of the held-out variance, worse than an "
                                  f"untrained one ({init_fve:.2f}); is the loss minimised (loss.backward(), "
                                  f"optimiser.step(), zero_grad each step), not maximised?")
            raise CheckFailed(f"{what}: your SAE explains {got_fve:.2f} of the held-out variance; the reference's "
                              f"explains {ref_fve:.2f} (untrained: {init_fve:.2f}). Check that every step samples a "
                              f"fresh batch, that the gradients reach all four tensors, and the learning rate.")
        if architecture == "standard":
            got_l0 = _sae.latent_statistics(_sae.encode(held_out, params, architecture))["l0"]
            ref_l0 = _sae.latent_statistics(_sae.encode(held_out, reference, architecture))["l0"]
            if got_l0 > 1.5 * ref_l0 + 1:
                raise CheckFailed(f"{what}: your ReLU SAE has L0 {got_l0:.1f}, the reference's {ref_l0:.1f}: is the "
                                  f"L1 penalty (l1_coefficient * the 'l1' term of sae_loss) in the loss you minimise?")
        again = answer(data, d_sae, architecture, k, l1, steps, batch, lr, seed)
        if not all(torch.allclose(again[name].detach().float(), params[name], atol=1e-5) for name in shapes):
            raise CheckFailed(f"{what}: two runs with the same seed gave different SAEs. Initialise with "
                              f"init_sae(..., seed) and draw batches from torch.Generator().manual_seed(seed), "
                              f"never from the global random state.")
    return f"{len(_training_cases(hidden))} trainings on planted sparse features"


# ---------------------------------------------------------------------------------------------------------
# 8.5 — fraction of variance explained
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.5", "fraction_variance_explained", "Fraction of variance explained", points=1,
          reference=_sae.fraction_variance_explained)
def fraction_variance_explained(answer, hidden):
    expect_callable(answer, "fraction_variance_explained")
    generator = torch.Generator().manual_seed(85)
    cases = []
    for shape, offset, noise in [((50, 8), 3.0, 0.5), ((4, 6, 8), 1.0, 0.8), ((40, 8), 0.0, 2.0)] + \
            ([((30, 11), -2.0, 0.3), ((3, 7, 5), 4.0, 1.5)] if hidden else []):
        x = torch.randn(*shape, generator=generator) * torch.linspace(0.5, 2, shape[-1]) + offset
        cases.append((x, x + noise * torch.randn(*shape, generator=generator)))
    for i, (x, recon) in enumerate(cases):
        what = f"case {i} (x {tuple(x.shape)})"
        got = as_number(answer(x.clone(), recon.clone()), what)
        expected = float(_sae.fraction_variance_explained(x, recon))
        if abs(got - expected) < 1e-4:
            continue
        flat, flat_recon = x.reshape(-1, x.shape[-1]), recon.reshape(-1, x.shape[-1])
        uncentred = float(1 - (flat - flat_recon).pow(2).sum() / flat.pow(2).sum())
        if abs(got - uncentred) < 1e-4:
            raise CheckFailed(f"{what}: you divided by the sum of x ** 2; divide by the variance about the mean "
                              f"activation, ((x - x.mean(0)) ** 2).sum(), or a constant offset counts as explained.")
        per_dim = float((1 - (flat - flat_recon).pow(2).sum(0) / (flat - flat.mean(0)).pow(2).sum(0)).mean())
        if abs(got - per_dim) < 1e-4:
            raise CheckFailed(f"{what}: you averaged a per-dimension ratio; take one ratio of totals (summed over "
                              f"tokens and dimensions), so high-variance dimensions weigh more.")
        if x.ndim == 3:
            per_pos = float(1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            if abs(got - per_pos) < 1e-4:
                raise CheckFailed(f"{what}: for a [batch, pos, d] input take the mean over every token (flatten "
                                  f"the leading dimensions first), not over the batch alone.")
        if abs(got - (1 - expected)) < 1e-4:
            raise CheckFailed(f"{what}: you returned the fraction *unexplained*; return 1 minus it.")
        raise CheckFailed(f"{what}: expected {expected:.4f}, got {got:.4f}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.6 — L0, dead and dense latents
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.6", "latent_statistics", "L0, dead and dense latents", points=1,
          reference=_sae.latent_statistics)
def latent_statistics(answer, hidden):
    expect_callable(answer, "latent_statistics")
    generator = torch.Generator().manual_seed(86)

    def sparse(shape, rate):
        acts = torch.rand(*shape, generator=generator) * (torch.rand(*shape, generator=generator) < rate)
        acts[..., :3] = 0  # three dead latents
        acts[..., 3] = 0.5 + torch.rand(shape[:-1], generator=generator)  # one that always fires
        return acts

    cases = [(sparse((200, 40), 0.05), 0.1), (sparse((4, 25, 30), 0.12), 0.1), (sparse((100, 20), 0.2), 0.25)]
    if hidden:
        cases += [(sparse((150, 64), 0.03), 0.05), (sparse((2, 50, 16), 0.3), 0.2)]
    for i, (acts, threshold) in enumerate(cases):
        what = f"case {i} (acts {tuple(acts.shape)}, dense_threshold {threshold})"
        got = answer(acts.clone(), threshold)
        expected = _sae.latent_statistics(acts, threshold)
        if not isinstance(got, dict) or not set(expected) <= set(got):
            raise CheckFailed(f"{what}: return a dict with keys {sorted(expected)}, got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        l0 = as_number(got["l0"], f"{what}, 'l0'")
        if abs(l0 - expected["l0"]) > 1e-4:
            flat = acts.reshape(-1, acts.shape[-1])
            if abs(l0 - float((flat > 0).float().mean())) < 1e-4:
                raise CheckFailed(f"{what}: your l0 ({l0:.4f}) is the fraction of all entries that are active; L0 is "
                                  f"the number of active latents per token, averaged over tokens "
                                  f"({expected['l0']:.3f}).")
            if abs(l0 - float(flat.sum(-1).mean())) < 1e-4:
                raise CheckFailed(f"{what}: your l0 sums the activations (that is L1); count the active ones (> 0).")
            raise CheckFailed(f"{what}: l0 is {l0:.4f}, expected {expected['l0']:.4f}.")
        expect_tensor(got["firing_rate"], expected["firing_rate"], f"{what}, 'firing_rate'", atol=1e-5,
                      hint="the fraction of tokens on which each latent is > 0: one number per latent.")
        n_dead, n_dense = as_number(got["n_dead"], f"{what}, 'n_dead'"), as_number(got["n_dense"], f"{what}, 'n_dense'")
        if n_dead != expected["n_dead"]:
            raise CheckFailed(f"{what}: n_dead is {n_dead:g}, expected {expected['n_dead']}: a dead latent is active "
                              f"on no token at all.")
        if n_dense != expected["n_dense"]:
            raise CheckFailed(f"{what}: n_dense is {n_dense:g}, expected {expected['n_dense']}: count the latents "
                              f"whose firing rate is above dense_threshold.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.7 — splicing the SAE into the forward pass
# ---------------------------------------------------------------------------------------------------------

SPLICE_PROMPTS = ["The old lighthouse keeper climbed the stairs every night to",
                  "In the kitchen, she mixed flour, sugar and eggs before"]
HIDDEN_SPLICE_PROMPTS = ["The committee will meet on Tuesday to discuss the budget and",
                         "My brother bought a new bicycle because the old one"]


def _splice_tokens(model, prompts):
    rows = [model.to_tokens(prompt)[0] for prompt in prompts]
    length = min(len(row) for row in rows)
    return torch.stack([row[:length] for row in rows])


def _spliced(model, tokens, hook_name, params, architecture, k, mode, mean):
    model.reset_hooks()
    return float(_sae.spliced_loss(model, tokens, hook_name, params, architecture, k, mode, mean))


@exercise("08", "8.7", "spliced_loss", "Splice the reconstruction into the forward pass", points=3,
          reference=_sae.spliced_loss)
def spliced_loss(answer, hidden):
    expect_callable(answer, "spliced_loss")
    model = model_for_checks()
    d_model = model.cfg.d_model
    generator = torch.Generator().manual_seed(87)
    mean = 2 * torch.randn(d_model, generator=generator)
    layers = [15] + ([9] if hidden else [])
    tokens = _splice_tokens(model, SPLICE_PROMPTS + (HIDDEN_SPLICE_PROMPTS if hidden else []))
    n_cases = 0
    for layer in layers:
        hook_name = f"blocks.{layer}.hook_resid_post"
        params = random_sae(d_model, 64, layer)
        params["W_dec"] = params["W_dec"] * 20
        for mode, architecture, k in [("clean", None, None), ("sae", "topk", 8), ("zero", None, None),
                                      ("mean", None, None)] + ([("sae", "standard", None)] if hidden else []):
            what = f"{hook_name}, mode {mode!r}{f' ({architecture})' if architecture else ''}"
            got = answer(model, tokens.clone(), hook_name, _copy_params(params), architecture, k, mode, mean.clone())
            hooks_left = any(hp._forward_hooks for hp in model.hook_dict.values())
            model.reset_hooks()
            if hooks_left:
                raise CheckFailed(f"{what}: your function left a hook on the model; use model.run_with_hooks (it "
                                  f"removes its hooks) or model.hooks(...) as a context manager.")
            got = as_number(got, what)
            expected = _spliced(model, tokens, hook_name, params, architecture, k, mode, mean)
            n_cases += 1
            if abs(got - expected) < 1e-3:
                continue
            if mode != "clean":
                everywhere = _spliced_everywhere(model, tokens, hook_name, params, architecture, k, mode, mean)
                if abs(got - everywhere) < 1e-3:
                    raise CheckFailed(f"{what}: you replaced the activation at the BOS position too. Leave position 0 "
                                      f"as it is (its residual norm is ~150x a normal token's; SAEs are not trained "
                                      f"on it) and replace positions 1 onwards.")
            clean = _spliced(model, tokens, hook_name, params, architecture, k, "clean", mean)
            if mode != "clean" and abs(got - clean) < 1e-3:
                raise CheckFailed(f"{what}: your loss equals the clean model's ({clean:.3f}); the replacement never "
                                  f"took effect. Return the modified activation from the hook, at `hook_name`.")
            if abs(got - _misaligned_loss(model, tokens, hook_name, params, architecture, k, mode, mean)) < 1e-3:
                raise CheckFailed(f"{what}: your loss compares each position's logits with its own token; the "
                                  f"logits at position t predict token t + 1 (logits[:, :-1] against tokens[:, 1:]).")
            raise CheckFailed(f"{what}: mean cross-entropy {got:.4f}, expected {expected:.4f}.")
    return f"{n_cases} splices at {len(layers)} layers"


def _spliced_everywhere(model, tokens, hook_name, params, architecture, k, mode, mean):
    def replace(activation, hook):
        if mode == "sae":
            return _sae.sae_forward(activation, params, architecture, k)[0]
        if mode == "zero":
            return torch.zeros_like(activation)
        return mean.expand_as(activation).clone()

    model.reset_hooks()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, replace)])
    return float(-logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).mean())


def _misaligned_loss(model, tokens, hook_name, params, architecture, k, mode, mean):
    def replace(activation, hook):
        activation = activation.clone()
        if mode == "sae":
            activation[:, 1:] = _sae.sae_forward(activation[:, 1:], params, architecture, k)[0]
        elif mode == "zero":
            activation[:, 1:] = 0
        elif mode == "mean":
            activation[:, 1:] = mean
        return activation

    model.reset_hooks()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, replace)])
    return float(-logits.log_softmax(-1).gather(-1, tokens[:, :, None]).mean())


# ---------------------------------------------------------------------------------------------------------
# 8.8 — loss recovered
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.8", "ce_loss_recovered", "Cross-entropy loss recovered", points=1,
          reference=_sae.ce_loss_recovered)
def ce_loss_recovered(answer, hidden):
    expect_callable(answer, "ce_loss_recovered")
    cases = [(2.5, 3.1, 9.0), (3.2, 3.9, 5.1), (2.0, 7.5, 6.0)]
    if hidden:
        cases += [(1.7, 2.2, 12.4), (4.1, 4.15, 8.3)]
    for i, (clean, spliced, ablated) in enumerate(cases):
        what = f"case {i} (clean {clean}, spliced {spliced}, ablated {ablated})"
        got = as_number(answer(clean, spliced, ablated), what)
        expected = _sae.ce_loss_recovered(clean, spliced, ablated)
        if abs(got - expected) < 1e-6:
            continue
        if abs(got - (1 - expected)) < 1e-6:
            raise CheckFailed(f"{what}: you returned the fraction of the loss *lost* (spliced - clean) / (ablated - "
                              f"clean); return the fraction recovered, (ablated - spliced) / (ablated - clean).")
        if abs(got - (ablated - spliced) / ablated) < 1e-6:
            raise CheckFailed(f"{what}: divide by ablated - clean (the loss the ablation destroys), not by ablated.")
        if abs(got - max(0.0, min(1.0, expected))) < 1e-6:
            raise CheckFailed(f"{what}: do not clip to [0, 1]: a reconstruction worse than the ablation gives a "
                              f"negative number, and that is worth seeing.")
        raise CheckFailed(f"{what}: expected {expected:.4f}, got {got:.4f}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.9 — top activations
# ---------------------------------------------------------------------------------------------------------


def _latent_acts(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) * 10 * (torch.rand(*shape, generator=generator) < density)


@exercise("08", "8.9", "top_activations", "A latent's top activations", points=1, reference=_sae.top_activations)
def top_activations(answer, hidden):
    expect_callable(answer, "top_activations")
    cases = [(_latent_acts((6, 9), 0.3, 0), 5), (_latent_acts((4, 7), 0.1, 1), 6), (_latent_acts((3, 11), 0.5, 2), 4)]
    if hidden:
        cases += [(_latent_acts((8, 5), 0.2, 3), 7), (_latent_acts((5, 13), 0.05, 4), 10)]
    for i, (acts, n) in enumerate(cases):
        what = f"case {i} (acts {tuple(acts.shape)}, n = {n}, {int((acts > 0).sum())} positive)"
        got = answer(acts.clone(), n)
        values, seqs, positions = _sae.top_activations(acts, n)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"{what}: return (values, sequence indices, positions), got {type(got).__name__}.")
        got_values, got_seqs, got_positions = got
        if isinstance(got_values, torch.Tensor) and got_values.numel() > values.numel() and \
                (got_values == 0).any():
            raise CheckFailed(f"{what}: you returned {got_values.numel()} entries including zeros; return only "
                              f"positive activations (at most n).")
        expect_tensor(got_values, values, f"{what}, values", atol=1e-6,
                      hint="the n largest positive activations, largest first.")
        if isinstance(got_seqs, torch.Tensor) and isinstance(got_positions, torch.Tensor) and \
                torch.equal(got_seqs.long(), positions) and torch.equal(got_positions.long(), seqs):
            raise CheckFailed(f"{what}: sequence indices and positions are swapped.")
        if isinstance(got_seqs, torch.Tensor) and got_seqs.shape == seqs.shape and \
                torch.equal(got_seqs.long(), (seqs * acts.shape[1] + positions) // acts.shape[0]):
            raise CheckFailed(f"{what}: a flat index i into [n_seq, seq_len] is at sequence i // seq_len and "
                              f"position i % seq_len.")
        expect_tensor(got_seqs, seqs, f"{what}, sequence indices")
        expect_tensor(got_positions, positions, f"{what}, positions")
        if not torch.equal(acts[got_seqs.long(), got_positions.long()], values):
            raise CheckFailed(f"{what}: acts[seq, pos] at your indices are not your values.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.10 — promoted tokens
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.10", "promoted_tokens", "The tokens a latent promotes", points=1, reference=_sae.promoted_tokens)
def promoted_tokens(answer, hidden):
    expect_callable(answer, "promoted_tokens")
    generator = torch.Generator().manual_seed(810)
    cases = [(torch.randn(12, generator=generator), torch.randn(12, 50, generator=generator) + 0.3, 5),
             (torch.randn(8, generator=generator), torch.randn(8, 30, generator=generator) - 0.2, 3)]
    if hidden:
        cases += [(torch.randn(16, generator=generator), torch.randn(16, 70, generator=generator), 6)]
    for i, (direction, W_U, n) in enumerate(cases):
        what = f"case {i} (d_model {W_U.shape[0]}, vocab {W_U.shape[1]}, n = {n})"
        got = answer(direction.clone(), W_U.clone(), n)
        expected = _sae.promoted_tokens(direction, W_U, n)
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise CheckFailed(f"{what}: return (top ids, top logits, bottom ids, bottom logits), got "
                              f"{type(got).__name__}.")
        logits = direction @ W_U
        if isinstance(got[2], torch.Tensor) and got[2].shape == expected[2].shape and \
                torch.equal(got[2].long(), logits.topk(n, largest=False).indices.flip(0)):
            raise CheckFailed(f"{what}: your bottom tokens are in the wrong order: list the most negative first.")
        for j, name in enumerate(("top ids", "top logits", "bottom ids", "bottom logits")):
            expect_tensor(got[j].long() if j % 2 == 0 and isinstance(got[j], torch.Tensor) else got[j],
                          expected[j], f"{what}, {name}", atol=1e-5,
                          hint="logits = direction @ W_U; the top n by value, then the bottom n (most negative first).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.11 — a latent's dashboard statistics
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.11", "dashboard_statistics", "A latent's dashboard", points=3,
          reference=_dash.dashboard_statistics)
def dashboard_statistics(answer, hidden):
    expect_callable(answer, "dashboard_statistics")
    generator = torch.Generator().manual_seed(811)
    cases = [(_latent_acts((5, 20), 0.2, 10), 3, 4, 6), (_latent_acts((3, 9), 0.4, 11), 5, 3, 4)]
    if hidden:
        cases += [(_latent_acts((7, 15), 0.1, 12), 4, 2, 5), (_latent_acts((2, 30), 0.3, 13), 6, 5, 8)]
    for i, (acts, n_top, window, n_bins) in enumerate(cases):
        acts[0, 0] = 20.0  # the top activation sits at a sequence's start: its context is cut there
        acts[-1, -1] = 19.0  # the second at a sequence's end
        tokens = torch.randint(0, 40, acts.shape, generator=generator)
        direction, W_U = torch.randn(6, generator=generator), torch.randn(6, 40, generator=generator)
        what = f"case {i} (acts {tuple(acts.shape)}, n_top {n_top}, window {window}, n_bins {n_bins})"
        got = answer(acts.clone(), tokens.clone(), direction.clone(), W_U.clone(), n_top, window, n_bins)
        expected = _dash.dashboard_statistics(acts, tokens, direction, W_U, n_top, window, n_bins)
        if not isinstance(got, dict) or not set(expected) <= set(got):
            raise CheckFailed(f"{what}: return a dict with keys {sorted(expected)}, got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        rate = as_number(got["firing_rate"], f"{what}, 'firing_rate'")
        if abs(rate - expected["firing_rate"]) > 1e-6:
            raise CheckFailed(f"{what}: firing_rate is {rate:.4f}, expected {expected['firing_rate']:.4f} (the "
                              f"fraction of all positions where the latent is > 0).")
        expect_tensor(got["top_values"], expected["top_values"], f"{what}, 'top_values'", atol=1e-6)
        contexts = [list(map(int, c.tolist() if isinstance(c, torch.Tensor) else c)) for c in got["contexts"]]
        for j, (mine, theirs) in enumerate(zip(contexts, expected["contexts"])):
            if mine == theirs:
                continue
            if j == 0 and len(mine) < len(theirs):
                raise CheckFailed(f"{what}: the top activation is at position 0, and its context came out "
                                  f"{mine}: clip the window's start at 0 (a negative start slices from the end).")
            raise CheckFailed(f"{what}: context {j} is {mine}, expected {theirs} (tokens from pos - window to pos + "
                              f"window inclusive, cut at the sequence's ends).")
        if len(contexts) != len(expected["contexts"]):
            raise CheckFailed(f"{what}: {len(contexts)} contexts, expected {len(expected['contexts'])}.")
        highlight = [int(h) for h in got["highlight"]]
        if highlight != expected["highlight"]:
            raise CheckFailed(f"{what}: highlight is {highlight}, expected {expected['highlight']}: the index of the "
                              f"activating token inside its (possibly cut) context.")
        counts = got["histogram"]
        if isinstance(counts, torch.Tensor) and counts.shape == expected["histogram"].shape and \
                abs(float(counts.sum()) - acts.numel()) < 0.5:
            raise CheckFailed(f"{what}: your histogram counts every position, zeros included; count only the "
                              f"positive activations.")
        expect_tensor(counts.float() if isinstance(counts, torch.Tensor) else counts, expected["histogram"],
                      f"{what}, 'histogram'", hint="torch.histc of the positive activations, n_bins bins from 0 to "
                                                   "the maximum.")
        expect_tensor(got["promoted"].long() if isinstance(got["promoted"], torch.Tensor) else got["promoted"],
                      expected["promoted"], f"{what}, 'promoted'",
                      hint="the n_top token ids with the largest direction @ W_U.")
    return f"{len(cases)} latents"


# ---------------------------------------------------------------------------------------------------------
# 8.12 — clamping a latent
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.12", "clamp_latent", "Clamp one latent", points=2, reference=_sae.clamp_latent)
def clamp_latent(answer, hidden):
    expect_callable(answer, "clamp_latent")
    generator = torch.Generator().manual_seed(812)
    cases = [(torch.randn(6, 10, generator=generator), random_sae(10, 24, 5), "topk", 4, 3, 7.5),
             (torch.randn(2, 4, 10, generator=generator), random_sae(10, 24, 6), "standard", None, 10, 0.0)]
    if hidden:
        cases += [(torch.randn(5, 12, generator=generator), random_sae(12, 30, 7), "topk", 5, 29, 12.0)]
    for i, (resid, params, architecture, k, latent, value) in enumerate(cases):
        what = f"case {i} ({architecture}, latent {latent} clamped to {value})"
        got = answer(resid.clone(), _copy_params(params), architecture, k, latent, value)
        expected = _sae.clamp_latent(resid, params, architecture, k, latent, value)
        if _close(got, expected, atol=1e-5):
            continue
        acts = _sae.encode(resid, params, architecture, k)
        if _close(got, resid + value * params["W_dec"][latent], atol=1e-5):
            raise CheckFailed(f"{what}: you added value * W_dec[latent] on top of what the latent already "
                              f"contributes; add (value - its current activation) * W_dec[latent].")
        clamped_acts = acts.clone()
        clamped_acts[..., latent] = value
        if _close(got, _sae.decode(clamped_acts, params), atol=1e-5):
            raise CheckFailed(f"{what}: you returned the SAE's reconstruction with the latent clamped, which drops "
                              f"the SAE's error (resid - reconstruction). Keep the residual and change only the "
                              f"latent's contribution.")
        if _close(got, resid + (value - acts[..., latent, None]) * params["W_enc"][:, latent], atol=1e-5):
            raise CheckFailed(f"{what}: you moved along the encoder column W_enc[:, latent]; a latent writes to the "
                              f"residual through its decoder row W_dec[latent].")
        expect_tensor(got, expected, what, atol=1e-5, hint="resid + (value - acts[..., latent]) * W_dec[latent].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 8.13 — generation with a clamped latent
# ---------------------------------------------------------------------------------------------------------

CLAMP_PROMPTS = [["The weather today is", "My favourite hobby is"],
                 ["Yesterday I went to the", "The best way to learn is"]]


def _clamp_tokens(model, prompts):
    rows = [model.to_tokens(prompt)[0] for prompt in prompts]
    length = min(len(row) for row in rows)
    return torch.stack([row[:length] for row in rows])


def _prompt_only_clamp(model, tokens, hook_name, params, architecture, k, latent, value, n_new):
    """The mistake of clamping only while reading the prompt: later steps run unclamped."""
    out = _sae.generate_clamped(model, tokens, hook_name, params, architecture, k, latent, value, 1)
    return _sae.generate_clamped(model, out, hook_name, params, architecture, k, None, None, n_new - 1)


@exercise("08", "8.13", "generate_clamped", "Generate with a clamped latent", points=3,
          reference=_sae.generate_clamped)
def generate_clamped(answer, hidden):
    expect_callable(answer, "generate_clamped")
    model = model_for_checks()
    d_model = model.cfg.d_model
    settings = [(0, 15, 60.0, 5), (1, 9, 40.0, 4)] + ([(1, 12, 80.0, 5)] if hidden else [])
    for i, (prompt_set, layer, value, n_new) in enumerate(settings):
        if i == 2:
            prompt_set = 0
        tokens = _clamp_tokens(model, CLAMP_PROMPTS[prompt_set])
        hook_name = f"blocks.{layer}.hook_resid_post"
        params = random_sae(d_model, 32, 100 + i, unit_decoder=True)
        latent = 7 + i
        what = f"case {i} ({hook_name}, latent {latent} clamped to {value}, {n_new} new tokens)"
        got = answer(model, tokens.clone(), hook_name, _copy_params(params), "topk", 4, latent, value, n_new)
        hooks_left = any(hp._forward_hooks for hp in model.hook_dict.values())
        model.reset_hooks()
        if hooks_left:
            raise CheckFailed(f"{what}: your function left a hook on the model; remove it when you are done "
                              f"(model.hooks(...) as a context manager, or model.reset_hooks()).")
        expected = _sae.generate_clamped(model, tokens, hook_name, params, "topk", 4, latent, value, n_new)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a tensor of token ids, got {type(got).__name__}.")
        if tuple(got.shape) == (tokens.shape[0], n_new):
            raise CheckFailed(f"{what}: you returned only the new tokens; return the prompt followed by them, "
                              f"shape {tuple(expected.shape)}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [batch, prompt + max_new_tokens], "
                              f"got {tuple(got.shape)}.")
        got = got.long()
        if torch.equal(got, expected):
            continue
        if not torch.equal(got[:, :tokens.shape[1]], tokens):
            raise CheckFailed(f"{what}: the first {tokens.shape[1]} tokens of your output are not the prompt.")
        unclamped = _sae.generate_clamped(model, tokens, hook_name, params, "topk", 4, None, None, n_new)
        if torch.equal(got, unclamped):
            raise CheckFailed(f"{what}: your generation is the unclamped one; the clamp never took effect (apply "
                              f"clamp_latent in a hook at hook_name and return its result).")
        if torch.equal(got, _prompt_only_clamp(model, tokens, hook_name, params, "topk", 4, latent, value, n_new)):
            raise CheckFailed(f"{what}: only the first new token is steered; keep the hook on for every forward pass "
                              f"(and, with a KV cache, on every new token's position).")
        shown = [model.to_string(row[tokens.shape[1]:]) for row in got]
        wanted = [model.to_string(row[tokens.shape[1]:]) for row in expected]
        raise CheckFailed(f"{what}: your continuations {shown} differ from the reference's {wanted}. Decode greedily "
                          f"(argmax of the last position's logits), clamp every position but BOS.")
    return f"{len(settings)} clamped generations"


# ---------------------------------------------------------------------------------------------------------
# 8.14 — perplexity of a continuation
# ---------------------------------------------------------------------------------------------------------


@exercise("08", "8.14", "continuation_perplexity", "The fluency cost: perplexity of a continuation", points=2,
          reference=_sae.continuation_perplexity)
def continuation_perplexity(answer, hidden):
    expect_callable(answer, "continuation_perplexity")
    model = model_for_checks()
    texts = [["The cat sat on the mat and looked out of the window at the birds",
              "Paris is the capital of France and its largest city by population"],
             ["Banana telescope quickly under seventeen purple arguments of the lamp",
              "She opened the door, smiled, and said that dinner was ready now"]]
    settings = [(0, 4), (1, 6)] + ([(0, 7), (1, 3)] if hidden else [])
    for i, (text_set, prompt_length) in enumerate(settings):
        tokens = _clamp_tokens(model, texts[text_set])
        what = f"case {i} ({tokens.shape[0]} rows of {tokens.shape[1]} tokens, prompt_length {prompt_length})"
        got = answer(model, tokens.clone(), prompt_length)
        model.reset_hooks()
        expected = _sae.continuation_perplexity(model, tokens, prompt_length)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and expected.numel() > 1:
            raise CheckFailed(f"{what}: return one perplexity per row, shape {tuple(expected.shape)}, not one number.")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)}, got "
                              f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.")
        got = got.detach().float()
        if _close(got, expected, rtol=1e-3):
            continue
        if _close(got, expected.log(), rtol=1e-3):
            raise CheckFailed(f"{what}: you returned the mean negative log-probability; perplexity is its exp.")
        for shift in (-1, 1):
            if 1 <= prompt_length + shift < tokens.shape[1] and _close(
                    got, _sae.continuation_perplexity(model, tokens, prompt_length + shift), rtol=1e-3):
                raise CheckFailed(f"{what}: you scored the tokens from position {prompt_length + shift}; score "
                                  f"tokens[:, prompt_length:], each predicted by the logits one position earlier.")
        if _close(got, _sae.continuation_perplexity(model, tokens, 1), rtol=1e-3):
            raise CheckFailed(f"{what}: you scored the prompt too; score only the continuation.")
        expect_tensor(got, expected, what, rtol=1e-3,
                      hint="exp(mean over the continuation of -log p(token | everything before it)).")
    return f"{len(settings)} cases"
