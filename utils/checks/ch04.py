"""Checks for chapter 04 — Activation patching and the IOI circuit.

References come from `utils.patching` (later chapters import the same helpers). Every check runs the learner's
answer on small synthetic tensors whose right answer is known (fast, no model), and when it is wrong compares it
with the usual mistakes (wrong sign, wrong block layout, patching too much, averaging instead of summing) to say
which one it is.
"""

from __future__ import annotations

import torch

from utils import patching as _patching
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def _shape(got, expected, what: str, hint: str) -> None:
    if got is None:
        raise CheckFailed(f"{what}: your function returned None. Return the tensor.")
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}")


# ---------------------------------------------------------------------------------------------------------
# 4.1 — the normalised metric
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.1", "normalised_metric", "A metric from 0 (corrupted) to 1 (clean)")
def normalised_metric(answer, hidden):
    expect_callable(answer, "normalised_metric")
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([3.5, 0.2, 1.85, -1.0]), 3.5, 0.2), (3 * torch.randn(2, 5, generator=generator), 2.0, -1.0)]
    if hidden:
        cases += [(torch.randn(30, 9, generator=generator), 4.2, -0.7), (torch.tensor(1.0), 1.5, 0.5)]
    for i, (value, clean, corrupted) in enumerate(cases):
        what = f"case {i} (clean = {clean}, corrupted = {corrupted}, values of shape {tuple(value.shape)})"
        got = answer(value.clone(), torch.tensor(clean), torch.tensor(corrupted))
        expected = _patching.normalised_metric(value, clean, corrupted)
        _shape(got, expected, what, "Keep the shape of `value`: the formula works elementwise.")
        if _close(got, expected):
            continue
        if _close(got, (value - clean) / (corrupted - clean)):
            raise CheckFailed(f"{what}: your scale is flipped: the clean run must score 1 and the corrupted run 0, "
                              f"i.e. (value - corrupted) / (clean - corrupted).")
        if _close(got, value / clean):
            raise CheckFailed(f"{what}: you divided by the clean value only. Subtract the corrupted baseline first, "
                              f"so that the corrupted run scores 0.")
        if _close(got, (value - corrupted) / clean):
            raise CheckFailed(f"{what}: divide by the gap (clean - corrupted), not by clean alone, so that the clean "
                              f"run scores exactly 1.")
        expect_tensor(got, expected, what, hint="(value - corrupted) / (clean - corrupted).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.2 — patch one position per copy
# ---------------------------------------------------------------------------------------------------------


def _position_cases(hidden: bool):
    cases = [(2, 6, 4, [3, 5], 0), (3, 5, 2, [0, 2, 4], 1)]  # (batch, pos, d, positions, seed)
    if hidden:
        cases += [(1, 7, 3, [6, 1, 1, 4], 2), (4, 4, 5, [2], 3)]
    for batch, n_pos, d, positions, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        corrupted = torch.randn(batch, n_pos, d, generator=generator)
        clean = torch.randn(batch, n_pos, d, generator=generator)
        yield (f"batch={batch}, pos={n_pos}, positions={positions}", corrupted.repeat(len(positions), 1, 1), clean,
               positions)


@exercise("04", "4.2", "patch_each_position", "Patch one position in each copy of the batch", points=2)
def patch_each_position(answer, hidden):
    expect_callable(answer, "patch_each_position")
    for what, act, clean, positions in _position_cases(hidden):
        got = answer(act.clone(), None, clean.clone(), list(positions))
        expected = _patching.patch_each_position(act.clone(), None, clean, positions)
        _shape(got, expected, what, "Return the whole (patched) activation, [n_copies * batch, pos, d].")
        if _close(got, expected):
            continue
        batch, n_copies = clean.shape[0], len(positions)
        if _close(got, act):
            raise CheckFailed(f"{what}: nothing was patched. Assign into the activation (act[rows, position] = ...) "
                              f"and return it.")
        interleaved = act.clone()
        for i, position in enumerate(positions):
            interleaved[i::n_copies, position] = clean[:, position]
        if _close(got, interleaved):
            raise CheckFailed(f"{what}: wrong row layout. The copies are stacked as blocks (act.repeat(n_copies, 1, "
                              f"1)): copy i is rows i * batch .. (i + 1) * batch, not every n_copies-th row.")
        onwards = act.clone()
        for i, position in enumerate(positions):
            onwards[i * batch:(i + 1) * batch, position:] = clean[:, position:]
        if _close(got, onwards):
            raise CheckFailed(f"{what}: you patched position p and every later position. Patch position "
                              f"positions[i] only: the question is what that one position carries.")
        everywhere = act.clone()
        for position in positions:
            everywhere[:, position] = clean.repeat(n_copies, 1, 1)[:, position]
        if _close(got, everywhere):
            raise CheckFailed(f"{what}: you patched every position in every copy. Copy i gets position positions[i] "
                              f"only.")
        expect_tensor(got, expected, what, hint="for copy i: act[i*batch:(i+1)*batch, positions[i]] = "
                      "clean_act[:, positions[i]].")
    return "synthetic activations"


# ---------------------------------------------------------------------------------------------------------
# 4.3 — patch one head per copy
# ---------------------------------------------------------------------------------------------------------


def _head_cases(hidden: bool):
    cases = [(2, 4, 3, 5, 0), (3, 3, 4, 2, 1)]  # (batch, pos, heads, d_head, seed)
    if hidden:
        cases += [(1, 5, 9, 3, 2), (4, 2, 2, 4, 3)]
    for batch, n_pos, n_heads, d_head, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        corrupted = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        clean = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        yield f"batch={batch}, pos={n_pos}, n_heads={n_heads}", corrupted.repeat(n_heads, 1, 1, 1), clean


@exercise("04", "4.3", "patch_each_head", "Patch one head in each copy of the batch", points=2)
def patch_each_head(answer, hidden):
    expect_callable(answer, "patch_each_head")
    for what, z, clean in _head_cases(hidden):
        got = answer(z.clone(), None, clean.clone())
        expected = _patching.patch_each_head(z.clone(), None, clean)
        _shape(got, expected, what, "Return the whole (patched) hook_z, [n_heads * batch, pos, n_heads, d_head].")
        if _close(got, expected):
            continue
        batch, n_heads = clean.shape[0], clean.shape[2]
        if _close(got, z):
            raise CheckFailed(f"{what}: nothing was patched. Assign into z and return it.")
        if _close(got, clean.repeat(n_heads, 1, 1, 1)):
            raise CheckFailed(f"{what}: every head of every copy was patched, so every copy is the clean run. Copy h "
                              f"gets head h only.")
        interleaved = z.clone()
        for head in range(n_heads):
            interleaved[head::n_heads, :, head] = clean[:, :, head]
        if _close(got, interleaved):
            raise CheckFailed(f"{what}: wrong row layout. Copy h is the block of rows h * batch .. (h + 1) * batch "
                              f"(z.repeat(n_heads, ...)), not every n_heads-th row.")
        last_only = z.clone()
        for head in range(n_heads):
            last_only[head * batch:(head + 1) * batch, -1, head] = clean[:, -1, head]
        if _close(got, last_only):
            raise CheckFailed(f"{what}: you patched the last position only. Patch head h at every position.")
        expect_tensor(got, expected, what, hint="z[h*batch:(h+1)*batch, :, h] = clean_z[:, :, h].")
    return "synthetic hook_z"


# ---------------------------------------------------------------------------------------------------------
# 4.4 — attention from END to a name
# ---------------------------------------------------------------------------------------------------------


def _random_pattern(batch: int, n_heads: int, n_pos: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(batch, n_heads, n_pos, n_pos, generator=generator)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@exercise("04", "4.4", "end_attention", "How much does each head attend from END to a name?")
def end_attention(answer, hidden):
    expect_callable(answer, "end_attention")
    cases = [(3, 4, 6, [1, 3, 2], 0), (4, 2, 5, [2, 2, 4, 0], 1)]  # (batch, heads, pos, key positions, seed)
    if hidden:
        cases += [(1, 9, 7, [5], 2), (5, 3, 8, [1, 6, 3, 2, 7], 3)]
    for batch, n_heads, n_pos, keys, seed in cases:
        pattern = _random_pattern(batch, n_heads, n_pos, seed)
        key_positions = torch.tensor(keys)
        what = f"pattern [batch={batch}, heads={n_heads}, pos={n_pos}], key positions {keys}"
        got = answer(pattern.clone(), key_positions.clone())
        expected = _patching.end_attention(pattern, key_positions)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (batch, n_heads) and batch != n_heads:
            raise CheckFailed(f"{what}: you returned one value per prompt and head, shape {(batch, n_heads)}; "
                              f"average over the prompts to get [n_heads].")
        if isinstance(got, torch.Tensor) and got.ndim == 3:
            raise CheckFailed(f"{what}: shape {tuple(got.shape)}: `pattern[:, :, -1, key_positions]` pairs every "
                              f"prompt with every prompt's key. Index the batch and the key together: "
                              f"pattern[arange(batch), :, -1, key_positions].")
        _shape(got, expected, what, "One number per head: [n_heads].")
        if _close(got, expected):
            continue
        rows = torch.arange(batch)
        bos_query, swapped = pattern[rows, :, 0, key_positions].mean(0), pattern[rows, :, key_positions, -1].mean(0)
        if _close(got, bos_query) and _close(got, swapped):
            raise CheckFailed(f"{what}: your values are those of a query that cannot see the key (causal attention "
                              f"to a later position is 0): either you swapped query and key (pattern[b, h, query, "
                              f"key], query = END = -1) or you read the query at position 0 (BOS).")
        if _close(got, bos_query):
            raise CheckFailed(f"{what}: you read the query at position 0 (BOS). END is the last position, -1.")
        if _close(got, pattern[rows, :, key_positions, -1].mean(0)):
            raise CheckFailed(f"{what}: you swapped query and key. pattern[b, h, query, key]: the query is the last "
                              f"position (END), the key the name's position.")
        if _close(got, pattern[:, :, -1, key_positions].mean(dim=(0, 2))):
            raise CheckFailed(f"{what}: you averaged every prompt's attention to every prompt's key position. Pair "
                              f"prompt b with key_positions[b] only.")
        expect_tensor(got, expected, what, hint="pattern[arange(batch), :, -1, key_positions].mean(0).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.5 — what a sender head adds
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.5", "head_output_delta", "What a sender head adds to the residual stream")
def head_output_delta(answer, hidden):
    expect_callable(answer, "head_output_delta")
    cases = [(2, 4, 3, 5, 7, 1, 0), (3, 2, 4, 2, 6, 3, 1)]  # (batch, pos, heads, d_head, d_model, head, seed)
    if hidden:
        cases += [(1, 5, 9, 4, 8, 0, 2), (2, 3, 2, 3, 3, 1, 3)]
    for batch, n_pos, n_heads, d_head, d_model, head, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        clean = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        corrupted = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        W_O = torch.randn(n_heads, d_head, d_model, generator=generator)
        what = f"batch={batch}, pos={n_pos}, n_heads={n_heads}, d_model={d_model}, head={head}"
        got = answer(clean.clone(), corrupted.clone(), W_O.clone(), head)
        expected = _patching.head_output_delta(clean, corrupted, W_O, head)
        _shape(got, expected, what, "The delta is a residual-stream vector per prompt and position: [batch, pos, "
                                    "d_model] (multiply by that head's W_O).")
        if _close(got, expected):
            continue
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign. The delta is clean minus corrupted: adding it to the corrupted "
                              f"run gives the clean head output.")
        if _close(got, clean[:, :, head] @ W_O[head]):
            raise CheckFailed(f"{what}: you returned the clean output itself. Subtract what the head writes on the "
                              f"corrupted run: the corrupted residual stream already contains that.")
        if n_heads > 1 and _close(got, (clean[:, :, (head + 1) % n_heads] - corrupted[:, :, (head + 1) % n_heads])
                                  @ W_O[(head + 1) % n_heads]):
            raise CheckFailed(f"{what}: you used the wrong head's slice; index the head axis (dim 2 of z, dim 0 of "
                              f"W_O) with `head`.")
        expect_tensor(got, expected, what, hint="(clean_z[:, :, head] - corrupted_z[:, :, head]) @ W_O[head].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.6 — attribution patching
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.6", "attribution_scores", "Attribution patching: a linear estimate for every head", points=2)
def attribution_scores(answer, hidden):
    expect_callable(answer, "attribution_scores")
    cases = [(3, 2, 4, 3, 5, 0), (2, 4, 3, 2, 2, 1)]  # (layers, batch, pos, heads, d_head, seed)
    if hidden:
        cases += [(1, 1, 6, 9, 3, 2), (4, 3, 2, 2, 4, 3)]
    for n_layers, batch, n_pos, n_heads, d_head, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        shape = (n_layers, batch, n_pos, n_heads, d_head)
        clean, corrupted, grad = (torch.randn(*shape, generator=generator) for _ in range(3))
        what = f"z of shape {shape}"
        got = answer(clean.clone(), corrupted.clone(), grad.clone())
        expected = _patching.attribution_scores(clean, corrupted, grad)
        _shape(got, expected, what, "One score per head: [n_layers, n_heads] (sum over prompts, positions and "
                                    "d_head).")
        if _close(got, expected):
            continue
        diff = (clean - corrupted) * grad
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign. Patching moves the activation from corrupted to clean: the change "
                              f"is (clean - corrupted), dotted with the gradient.")
        if batch > 1 and _close(got, diff.sum(dim=(2, 4)).mean(1)):
            raise CheckFailed(f"{what}: you averaged over the prompts. The gradient of the *mean* metric already "
                              f"carries the 1 / batch: sum over prompts.")
        if _close(got, (clean * grad).sum(dim=(1, 2, 4))):
            raise CheckFailed(f"{what}: you dotted the clean activation with the gradient. Use the change patching "
                              f"makes, clean - corrupted.")
        if _close(got, diff.abs().sum(dim=(1, 2, 4))) or _close(got, diff.sum(dim=(1, 2, 4)).abs()):
            raise CheckFailed(f"{what}: keep the sign: a head whose patch lowers the metric must score negative.")
        expect_tensor(got, expected, what, hint="((clean - corrupted) * grad).sum over batch, pos and d_head.")
    return f"{len(cases)} cases"
