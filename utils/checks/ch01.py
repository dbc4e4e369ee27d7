"""Checks for chapter 01 — The logit lens (and where it breaks).

References come from `utils.lens` (the course's own lens code, reused by later chapters). Every check runs the
learner's answer on small inputs and, when it is wrong, compares it with the usual mistakes to say which one.
"""

from __future__ import annotations

import math

import torch

from utils import lens as _lens
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_number, expect_tensor
from utils.models import model_for_checks

VISIBLE_PROMPTS = ["The Eiffel Tower is in the city of", "One, two, three, four,"]
HIDDEN_PROMPTS = ["Water boils at a temperature of one hundred degrees", "She opened the door and saw a"]

# Exercise 1.4: the layer from which the logit lens's mean KL to the final output stays below this (nats).
SETTLING_THRESHOLD = 1.0


def _prompts(hidden: bool) -> list[str]:
    return VISIBLE_PROMPTS + (HIDDEN_PROMPTS if hidden else [])


def _run(model, prompt: str):
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens, names_filter=_lens.resid_filter)
    return tokens, cache


def _close(got, expected, atol: float = 1e-3, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def _stack_with_mid(cache, n_layers: int) -> torch.Tensor:
    rows = [cache["blocks.0.hook_resid_pre"]]
    for layer in range(n_layers):
        rows += [cache[f"blocks.{layer}.hook_resid_mid"], cache[f"blocks.{layer}.hook_resid_post"]]
    return torch.stack(rows)


def _diagnose_lens_shape(got: torch.Tensor, expected: torch.Tensor, n_layers: int, what: str) -> None:
    """Raise a specific CheckFailed when `got` has the wrong shape (expected [n_layers + 1, batch, pos, d_vocab])."""
    shape, want = tuple(got.shape), tuple(expected.shape)
    if shape == want:
        return
    if got.ndim == 4 and shape[1:] == want[1:]:
        if shape[0] == n_layers:
            if _close(got, expected[1:]):
                raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: you are missing the embedding "
                                  f"row (layer 0 = blocks.0.hook_resid_pre, before any block).")
            if _close(got, expected[:-1]):
                raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: you are missing the last "
                                  f"block's output (blocks.{n_layers - 1}.hook_resid_post, the model's own output).")
            raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: off by one layer. Use the "
                              f"embedding output plus the resid_post of every block.")
        if shape[0] in (2 * n_layers, 2 * n_layers + 1):
            raise CheckFailed(f"{what}: {shape[0]} rows instead of {n_layers + 1}: it looks like you included "
                              f"resid_mid (the stream between attention and MLP). Keep only the embedding output "
                              f"and each block's resid_post.")
        raise CheckFailed(f"{what}: expected {n_layers + 1} layer rows (embedding + one per block), got {shape[0]}.")
    if sorted(shape) == sorted(want):
        raise CheckFailed(f"{what}: expected shape {want} = [layer, batch, pos, d_vocab], got {shape}: the axes are "
                          f"in the wrong order (stack the layers on a new first axis, torch.stack(..., dim=0)).")
    if shape and shape[-1] != want[-1]:
        raise CheckFailed(f"{what}: the last axis has size {shape[-1]}, expected d_vocab = {want[-1]}: return "
                          f"logits over the vocabulary (apply the unembedding), not residual vectors.")
    raise CheckFailed(f"{what}: expected shape {want} = [layer, batch, pos, d_vocab], got {shape}.")


# ---------------------------------------------------------------------------------------------------------
# 1.1 — the logit lens by hand
# ---------------------------------------------------------------------------------------------------------


@exercise("01", "1.1", "logit_lens", "The logit lens by hand", points=2)
def logit_lens(answer, hidden):
    expect_callable(answer, "logit_lens")
    model = model_for_checks()
    n_layers = model.cfg.n_layers
    prompts = _prompts(hidden)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            _, cache = _run(model, prompt)
            what = f"prompt {i} ({prompt!r})"
            got = answer(model, cache)
            expected = _lens.logit_lens(model, cache)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"{what}: expected a torch.Tensor of logits, got {type(got).__name__}.")
            _diagnose_lens_shape(got, expected, n_layers, what)
            if _close(got, expected):
                continue
            stack = _lens.resid_stack(cache, n_layers)
            if _close(got, model.unembed(stack)):
                raise CheckFailed(f"{what}: your logits are the unembedding of the raw residual stream. You forgot "
                                  f"the final norm: apply model.ln_final to each layer's residual before unembedding.")
            if _close(got, _lens.linearised_logit_lens(model, cache)):
                raise CheckFailed(f"{what}: you divided every layer by the final layer's norm scale (the cached "
                                  f"ln_final scale). The logit lens recomputes the norm for each layer's own residual.")
            if _close(got, expected.log_softmax(-1)) or _close(got, expected.softmax(-1), atol=1e-6):
                raise CheckFailed(f"{what}: you returned log-probabilities or probabilities; return the logits "
                                  f"(ln_final then the unembedding, no softmax).")
            if _close(got[1:], model.unembed(model.ln_final(torch.stack(
                    [cache[f"blocks.{layer}.hook_resid_mid"] for layer in range(n_layers)])))):
                raise CheckFailed(f"{what}: your rows 1..{n_layers} are read from resid_mid (after attention, before "
                                  f"the MLP). Use each block's resid_post.")
            expect_tensor(got, expected, what, atol=1e-3,
                          hint="row 0 is the embedding output, row l the output of block l-1; apply model.ln_final, "
                               "then model.unembed.")
    return f"{len(prompts)} prompts"


# ---------------------------------------------------------------------------------------------------------
# 1.2 — rank of the true next token
# ---------------------------------------------------------------------------------------------------------


@exercise("01", "1.2", "next_token_ranks", "Rank of the true next token at every layer")
def next_token_ranks(answer, hidden):
    expect_callable(answer, "next_token_ranks")
    model = model_for_checks()
    cases = []
    with torch.no_grad():
        for prompt in _prompts(hidden):
            tokens, cache = _run(model, prompt)
            cases.append((prompt, _lens.logit_lens(model, cache)[:, 0], tokens[0]))
        if hidden:
            generator = torch.Generator().manual_seed(1)
            cases.append(("random logits", torch.randn(4, 6, 50, generator=generator),
                          torch.randint(0, 50, (6,), generator=generator)))
    for i, (name, logits, tokens) in enumerate(cases):
        what = f"case {i} ({name!r})"
        got = answer(logits.clone(), tokens.clone())
        expected = _lens.next_token_ranks(logits, tokens)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor of ranks, got {type(got).__name__}.")
        n_pos = logits.shape[1]
        if tuple(got.shape) == (logits.shape[0], n_pos):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. The last "
                              f"position has no next token to rank: return pos - 1 = {n_pos - 1} columns, position p "
                              f"scored on tokens[p + 1].")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [layer, pos - 1], got "
                              f"{tuple(got.shape)}.")
        if got.dtype.is_floating_point:
            got = got.round()
        got = got.long().cpu()
        if torch.equal(got, expected):
            continue
        if torch.equal(got, expected - 1):
            raise CheckFailed(f"{what}: your ranks are one lower than expected everywhere: they start at 0. Use "
                              f"rank 1 for the top prediction (so that log10(rank) = 0 there).")
        own = logits[:, :-1].gather(-1, tokens[:-1].view(1, -1, 1).expand(logits.shape[0], -1, 1))
        same_position = (logits[:, :-1] > own).sum(-1) + 1  # position p scored on its own token tokens[p]
        if torch.equal(got, same_position) or torch.equal(got, same_position - 1):
            raise CheckFailed(f"{what}: you ranked each position's own input token. The prediction at position p is "
                              f"about the next token, tokens[p + 1].")
        from_bottom = logits.shape[-1] + 1 - expected
        if torch.equal(got, from_bottom) or torch.equal(got, from_bottom - 1):
            raise CheckFailed(f"{what}: your ranks count from the least likely token. Sort in descending order "
                              f"(rank 1 = the largest logit).")
        wrong = (got != expected).nonzero()[0].tolist()
        raise CheckFailed(f"{what}: rank at [layer {wrong[0]}, position {wrong[1]}] is {got[tuple(wrong)].item()}, "
                          f"expected {expected[tuple(wrong)].item()}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 1.3 — KL(final || lens)
# ---------------------------------------------------------------------------------------------------------


def _kl_cases(hidden: bool):
    generator = torch.Generator().manual_seed(0)
    final = 3 * torch.randn(5, 40, generator=generator)
    lens = torch.randn(3, 5, 40, generator=generator) * torch.tensor([0.5, 2.0, 6.0]).view(3, 1, 1)
    cases = [("random logits, final [5, 40], lens [3, 5, 40]", final, lens)]
    model = model_for_checks()
    with torch.no_grad():
        _, cache = _run(model, VISIBLE_PROMPTS[0])
        logits = _lens.logit_lens(model, cache)[:, 0]
        cases.append(("logit lens of prompt 0, final [pos, d_vocab], lens [layer, pos, d_vocab]",
                      logits[-1], logits[::5]))
        if hidden:
            cases.append(("identical distributions", final, final + 7.0))
            _, cache = _run(model, HIDDEN_PROMPTS[0])
            logits = _lens.logit_lens(model, cache)[:, 0]
            cases.append(("logit lens of a hidden prompt", logits[-1], logits[2::7]))
    return cases


@exercise("01", "1.3", "kl_from_final", "KL divergence from the final output", points=2)
def kl_from_final(answer, hidden):
    expect_callable(answer, "kl_from_final")
    cases = _kl_cases(hidden)
    for i, (name, final, lens) in enumerate(cases):
        what = f"case {i} ({name})"
        got = answer(final.clone(), lens.clone())
        expected = _lens.kl_from_final(final, lens)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (the vocabulary axis summed away, the "
                              f"others kept and broadcast), got {tuple(got.shape)}. Sum over the last axis only.")
        got = got.detach().float().cpu()
        if _close(got, expected, atol=1e-4, rtol=1e-3):
            continue
        if _close(got, _lens.kl_from_final(lens, final.expand_as(lens)), atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: you computed KL(lens || final). We want KL(final || lens): the expectation "
                              f"is taken under the final distribution, sum_v p_final(v) (log p_final(v) - log "
                              f"p_lens(v)).")
        if _close(got, expected / math.log(2), atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: your values are in bits (log base 2). Use natural logarithms (nats).")
        if _close(got, expected / final.shape[-1], atol=1e-6, rtol=1e-3):
            raise CheckFailed(f"{what}: you averaged over the vocabulary; a KL divergence sums over it.")
        raw = (final.softmax(-1) * (final - lens)).sum(-1)
        if _close(got, raw, atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: you used raw logits as log-probabilities. Apply log_softmax to both "
                              f"inputs first (logits are only defined up to a constant).")
        expect_tensor(got, expected, what, atol=1e-4, rtol=1e-3,
                      hint="log_softmax both inputs, then sum p_final * (log p_final - log p_lens) over the last axis.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 1.4 — where do the predictions settle?
# ---------------------------------------------------------------------------------------------------------


def settling_layer_from(mean_kl: torch.Tensor, threshold: float = SETTLING_THRESHOLD) -> int:
    """The first layer from which every later layer's mean KL is below `threshold`."""
    above = (mean_kl >= threshold).nonzero()
    return 0 if len(above) == 0 else int(above[-1]) + 1


def _reference_mean_kl(n_sequences: int) -> torch.Tensor:
    """The logit lens's mean KL per layer on the first `n_sequences` held-out rows the chapter uses."""
    from utils.corpus import corpus_token_batches

    model = model_for_checks()
    tokens = corpus_token_batches(model, n_sequences=N_SEQUENCES, seq_len=SEQ_LEN, seed=CORPUS_SEED)
    held_out = tokens[N_TRAIN_SEQUENCES:N_TRAIN_SEQUENCES + n_sequences]
    resid = _lens.collect_resid(model, held_out, progress=False)
    return _lens.mean_kl_per_layer(model, resid, lambda h, layer: _lens.unembed(model, h / _lens.rms(h)),
                                   progress=False)


# The chapter's corpus split (the notebook uses the same numbers).
CORPUS_SEED = 0
N_SEQUENCES = 112
SEQ_LEN = 64
N_TRAIN_SEQUENCES = 96


@exercise("01", "1.4", "settling_layer", "Where do the predictions settle?")
def settling_layer(answer, hidden):
    if answer is Ellipsis:  # the learner's notebook starts with `settling_layer = ...`
        raise NotImplementedError("Exercise 1.4")
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise CheckFailed(f"settling_layer: expected an int (a layer index 0..30), got {type(answer).__name__}.")
    mean_kl = _reference_mean_kl(1 if not hidden else 2)
    expected = settling_layer_from(mean_kl)
    first_below = int((mean_kl < SETTLING_THRESHOLD).nonzero()[0])
    if answer == expected:
        return f"layer {expected}"
    if abs(answer - expected) <= 1:
        return f"layer {answer}; on the check's sample of held-out tokens it is {expected}"
    if answer == first_below and first_below != expected:
        raise CheckFailed(f"settling_layer = {answer} is the first layer whose mean KL dips below "
                          f"{SETTLING_THRESHOLD} nat, but a later layer goes back above it. We want the layer from "
                          f"which the KL *stays* below the threshold.")
    raise CheckFailed(f"settling_layer = {answer}, expected about {expected} (the first layer from which the mean "
                      f"KL(final || logit lens) stays below {SETTLING_THRESHOLD} nat). Did you use your mean_kl from "
                      f"Exercise 1.3, over all {len(mean_kl)} rows (0 = embedding)?")


# ---------------------------------------------------------------------------------------------------------
# 1.5 — a translator in closed form
# ---------------------------------------------------------------------------------------------------------


def _regression_case(n: int, d: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator) * torch.linspace(0.5, 3.0, d) + torch.linspace(-2.0, 4.0, d)
    true_weight = torch.eye(d) + 0.3 * torch.randn(d, d, generator=generator)
    y = x @ true_weight + torch.linspace(1.0, -1.0, d) + 0.5 * torch.randn(n, d, generator=generator)
    return x, y


@exercise("01", "1.5", "fit_translator", "A tuned-lens translator in closed form", points=2)
def fit_translator(answer, hidden):
    expect_callable(answer, "fit_translator")
    cases = [(200, 6, 0.0, 0), (200, 6, 50.0, 1)]
    if hidden:
        cases += [(10, 12, 3.0, 2), (500, 16, 200.0, 3)]
    for i, (n, d, ridge, seed) in enumerate(cases):
        x, y = _regression_case(n, d, seed)
        what = f"case {i} (n={n}, d={d}, ridge={ridge:g})"
        got = answer(x.clone(), y.clone(), ridge)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return a pair (weight, bias), got {type(got).__name__}.")
        weight, bias = got
        expected_weight, expected_bias = _lens.fit_translator(x, y, ridge)
        for name, value, ref in (("weight", weight, expected_weight), ("bias", bias, expected_bias)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
                expect_tensor(value, ref, f"{what}, {name}")
        weight, bias = weight.detach().double(), bias.detach().double()
        if _close(weight, expected_weight, atol=1e-3, rtol=1e-3) and _close(bias, expected_bias, atol=1e-3, rtol=1e-3):
            continue
        if _close(weight.T, expected_weight, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your weight is the transpose of the reference. We use row vectors: "
                              f"translated = x @ weight + bias, so weight[i, j] maps input dim i to output dim j.")
        xd, yd = x.double(), y.double()
        xc, yc = xd - xd.mean(0), yd - yd.mean(0)
        eye = torch.eye(d, dtype=torch.float64)
        towards_zero = torch.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ yc)
        if ridge > 0 and _close(weight, towards_zero, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your ridge pulls the weight towards zero. The penalty is ridge * |W - I|^2: "
                              f"add ridge * I to the right-hand side as well, (Xc^T Xc + ridge I) W = Xc^T Yc + ridge I.")
        uncentred = torch.linalg.solve(xd.T @ xd + ridge * eye, xd.T @ yd + ridge * eye)
        if _close(weight, uncentred, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your weight was fitted without an intercept (x and y not centred). Centre "
                              f"both on their means, solve for the weight, then bias = mean(y) - mean(x) @ weight.")
        augmented = torch.cat([xd, torch.ones(n, 1, dtype=torch.float64)], 1)
        target_aug = torch.cat([eye, torch.zeros(1, d, dtype=torch.float64)], 0)
        solution = torch.linalg.solve(augmented.T @ augmented + ridge * torch.eye(d + 1, dtype=torch.float64),
                                      augmented.T @ yd + ridge * target_aug)
        if ridge > 0 and _close(weight, solution[:d], atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: you penalised the bias too (a column of ones inside the ridge). Only the "
                              f"weight is pulled towards the identity; centre x and y instead.")
        if _close(weight, expected_weight, atol=1e-3, rtol=1e-3):
            expect_tensor(bias.float(), expected_bias, f"{what}, bias", atol=1e-3, rtol=1e-3,
                          hint="bias = mean(y) - mean(x) @ weight.")
        expect_tensor(weight.float(), expected_weight, f"{what}, weight", atol=1e-3, rtol=1e-3,
                      hint="weight = solve(Xc^T Xc + ridge I, Xc^T Yc + ridge I) with Xc, Yc centred.")
    return f"{len(cases)} regressions"


# ---------------------------------------------------------------------------------------------------------
# 1.6 — the linearised lens
# ---------------------------------------------------------------------------------------------------------


@exercise("01", "1.6", "linearised_logit_lens", "Freezing the final norm's scale", points=2)
def linearised_logit_lens(answer, hidden):
    expect_callable(answer, "linearised_logit_lens")
    model = model_for_checks()
    n_layers = model.cfg.n_layers
    prompts = _prompts(hidden)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            _, cache = _run(model, prompt)
            what = f"prompt {i} ({prompt!r})"
            got = answer(model, cache)
            expected = _lens.linearised_logit_lens(model, cache)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"{what}: expected a torch.Tensor of logits, got {type(got).__name__}.")
            _diagnose_lens_shape(got, expected, n_layers, what)
            if _close(got, expected):
                continue
            stack = _lens.resid_stack(cache, n_layers)
            if _close(got, _lens.logit_lens(model, cache)):
                raise CheckFailed(f"{what}: this is the exact logit lens: you recomputed each layer's own norm scale. "
                                  f"Divide every layer by the scale of the *final* residual stream instead.")
            if _close(got, model.unembed(stack)):
                raise CheckFailed(f"{what}: you did not divide by any scale. Divide every layer's residual by the "
                                  f"final layer's RMS, then unembed.")
            final_rms = _lens.rms(stack[-1])
            if _close(got, model.unembed(stack * final_rms)):
                raise CheckFailed(f"{what}: you multiplied by the final scale; RMSNorm divides by it.")
            if _close(got, model.unembed(stack / _lens.rms(stack[0]))):
                raise CheckFailed(f"{what}: you used the embedding's scale (layer 0) for every layer; freeze the "
                                  f"scale of the final residual stream (blocks.{n_layers - 1}.hook_resid_post).")
            expect_tensor(got, expected, what, atol=1e-3,
                          hint="logits = unembed(h_l / rms(h_final)) for every layer l.")
    return f"{len(prompts)} prompts"
