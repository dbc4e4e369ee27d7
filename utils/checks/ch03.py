"""Checks for chapter 03 — Ablation (zero, mean, resample) and self-repair.

References come from `utils.ablation` (reused by later chapters). Every check runs the learner's answer on small
inputs and, when it is wrong, compares it with the usual mistakes to say which one.
"""

from __future__ import annotations

import torch

from utils import ablation as _ablation
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor
from utils.lens import rms
from utils.models import model_for_checks


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def _reference_logit_diff(logits, io_tokens, s_tokens):
    rows = torch.arange(logits.shape[0])
    return logits[rows, -1, io_tokens] - logits[rows, -1, s_tokens]


# ---------------------------------------------------------------------------------------------------------
# 3.1 — the logit difference
# ---------------------------------------------------------------------------------------------------------


def _logit_cases(hidden: bool):
    generator = torch.Generator().manual_seed(0)
    cases = [("random logits [3, 5, 20]", torch.randn(3, 5, 20, generator=generator),
              torch.tensor([1, 4, 7]), torch.tensor([2, 4 + 5, 0]))]
    if hidden:
        cases.append(("random logits [6, 9, 50]", 4 * torch.randn(6, 9, 50, generator=generator),
                      torch.randint(0, 50, (6,), generator=generator), torch.randint(0, 50, (6,), generator=generator)))
    return cases


@exercise("03", "3.1", "logit_diff_metric", "The logit difference")
def logit_diff_metric(answer, hidden):
    expect_callable(answer, "logit_diff_metric")
    cases = _logit_cases(hidden)
    for i, (name, logits, io, s) in enumerate(cases):
        what = f"case {i} ({name})"
        got = answer(logits.clone(), io.clone(), s.clone())
        expected = _reference_logit_diff(logits, io, s)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and expected.numel() > 1:
            raise CheckFailed(f"{what}: you returned one number; return one logit difference per prompt, shape "
                              f"{tuple(expected.shape)} (average later).")
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [batch], got {tuple(got.shape)}. "
                              f"Index the last position and one IO and one S token per prompt (not every pair).")
        if _close(got, expected):
            continue
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign: the metric is logit(IO) - logit(S), positive when the model "
                              f"prefers the indirect object.")
        if _close(got, _reference_logit_diff(logits[:, :1], io, s)):
            raise CheckFailed(f"{what}: you read position 0. The prediction of the answer is at the last position.")
        log_probs = logits.log_softmax(-1)
        if _close(got, log_probs[torch.arange(len(io)), -1, io]) or _close(got, logits[torch.arange(len(io)), -1, io]):
            raise CheckFailed(f"{what}: you returned the IO score alone; subtract the S logit.")
        expect_tensor(got, expected, what, hint="logits[i, -1, io_tokens[i]] - logits[i, -1, s_tokens[i]].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.2 / 3.3 — the ablation hooks
# ---------------------------------------------------------------------------------------------------------


def _z_cases(hidden: bool):
    generator = torch.Generator().manual_seed(1)
    cases = [("z [4, 6, 3, 5], reference [7, 6, 3, 5], head 1", torch.randn(4, 6, 3, 5, generator=generator),
              torch.randn(7, 6, 3, 5, generator=generator) + 2.0, 1)]
    if hidden:
        cases.append(("z [2, 5, 9, 8], reference [3, 5, 9, 8], head 8", torch.randn(2, 5, 9, 8, generator=generator),
                      torch.randn(3, 5, 9, 8, generator=generator) - 1.0, 8))
        cases.append(("z [3, 4, 9, 8], reference [5, 4, 9, 8], head 0", torch.randn(3, 4, 9, 8, generator=generator),
                      3 * torch.randn(5, 4, 9, 8, generator=generator), 0))
    return cases


def _apply(hook, z: torch.Tensor) -> torch.Tensor:
    if not callable(hook):
        raise CheckFailed(f"expected your function to return a hook function, got {type(hook).__name__}. Define "
                          f"`def hook(z, hook): ...` inside it and return it.")
    work = z.clone()
    out = hook(work, None)
    return work if out is None else out


@exercise("03", "3.2", "mean_ablation_hook", "Mean ablation", points=2)
def mean_ablation_hook(answer, hidden):
    expect_callable(answer, "mean_ablation_hook")
    cases = _z_cases(hidden)
    for i, (name, z, reference, head) in enumerate(cases):
        what = f"case {i} ({name})"
        got = _apply(answer(reference.clone(), head), z)
        expected = _apply(_ablation.mean_ablation_hook(reference, head), z)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(z.shape):
            raise CheckFailed(f"{what}: the hook must return hook_z with its shape {tuple(z.shape)} unchanged.")
        if _close(got, expected):
            continue
        if _close(got, z):
            raise CheckFailed(f"{what}: the hook left z unchanged. Assign into z[:, :, head] (and return z).")
        others = [h for h in range(z.shape[2]) if h != head]
        if not _close(got[:, :, others], z[:, :, others]):
            raise CheckFailed(f"{what}: your hook changed heads other than head {head}. Only z[:, :, head] changes.")
        mine = got[:, :, head]
        if _close(mine, torch.zeros_like(mine)):
            raise CheckFailed(f"{what}: you zeroed the head; mean ablation replaces it by its mean over the "
                              f"reference prompts.")
        if _close(mine, reference[:, :, head].mean((0, 1)).expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged over positions too. This chapter's mean is per position: "
                              f"average over the reference prompts (axis 0) only.")
        if _close(mine, z[:, :, head].mean(0, keepdim=True).expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged the activations being ablated; average `reference_z`, the "
                              f"reference prompts' activations.")
        if _close(mine, reference[:, :, :].mean((0, 2))[None].expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged over the heads too; average head {head} over prompts only.")
        expect_tensor(mine, expected[:, :, head], what, hint="z[:, :, head] = reference_z[:, :, head].mean(0).")
    return f"{len(cases)} cases"


@exercise("03", "3.3", "resample_ablation_hook", "Resample ablation", points=2)
def resample_ablation_hook(answer, hidden):
    expect_callable(answer, "resample_ablation_hook")
    cases = [(name, z, donor[:z.shape[0]] if donor.shape[0] >= z.shape[0] else torch.cat([donor] * 3)[:z.shape[0]],
              head) for name, z, donor, head in _z_cases(hidden)]
    for i, (name, z, donor, head) in enumerate(cases):
        what = f"case {i} (z {tuple(z.shape)}, donor {tuple(donor.shape)}, head {head})"
        got = _apply(answer(donor.clone(), head), z)
        expected = _apply(_ablation.resample_ablation_hook(donor, head), z)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(z.shape):
            raise CheckFailed(f"{what}: the hook must return hook_z with its shape {tuple(z.shape)} unchanged.")
        if _close(got, expected):
            continue
        if _close(got, z):
            raise CheckFailed(f"{what}: the hook left z unchanged. Assign into z[:, :, head] (and return z).")
        if _close(got, donor):
            raise CheckFailed(f"{what}: you replaced every head by the donor's. Only head {head} is resampled.")
        others = [h for h in range(z.shape[2]) if h != head]
        if not _close(got[:, :, others], z[:, :, others]):
            raise CheckFailed(f"{what}: your hook changed heads other than head {head}.")
        mine = got[:, :, head]
        if _close(mine, donor[:, :, head].mean(0, keepdim=True).expand_as(mine)):
            raise CheckFailed(f"{what}: you used the donors' mean: that is mean ablation. Row i takes donor row i.")
        if _close(mine, donor[:1, :, head].expand_as(mine)):
            raise CheckFailed(f"{what}: every row got donor row 0. Row i takes donor_z[i].")
        expect_tensor(mine, expected[:, :, head], what, hint="z[:, :, head] = donor_z[:, :, head].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.4 — direct effect of a head
# ---------------------------------------------------------------------------------------------------------

_DIRECT_CASES = [(20, 3), (29, 0)]
_HIDDEN_DIRECT_CASES = [(25, 7), (0, 4)]


def _direct_data(hidden: bool):
    from utils.ioi import make_ioi_dataset

    model = model_for_checks()
    data = make_ioi_dataset(model, n_prompts=4 if hidden else 2, seed=11)
    z, final = _ablation.head_z(model, data.tokens)
    return model, data, z, final


@exercise("03", "3.4", "head_direct_effect", "Direct effect of a head", points=2)
def head_direct_effect(answer, hidden):
    expect_callable(answer, "head_direct_effect")
    model, data, z, final = _direct_data(hidden)
    io, s = data.io_tokens, data.s_tokens
    cases = _DIRECT_CASES + (_HIDDEN_DIRECT_CASES if hidden else [])
    direction = _ablation.logit_diff_direction(model, io, s)
    with torch.no_grad():
        for layer, head in cases:
            what = f"L{layer}H{head}"
            got = answer(model, z[layer].clone(), final.clone(), layer, head, io, s)
            expected = _ablation.head_direct_effect(model, z[layer], final, layer, head, io, s)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
            if tuple(got.shape) != tuple(expected.shape):
                raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [batch] (one direct effect per "
                                  f"prompt, at the last position), got {tuple(got.shape)}.")
            if _close(got, expected, atol=1e-3, rtol=1e-3):
                continue
            out = z[layer][:, -1, head] @ model.W_O[layer, head]
            if _close(got, -expected, atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: wrong sign: project on W_U[:, IO] - W_U[:, S].")
            if _close(got, (out * direction.T).sum(-1), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you forgot the final norm: divide the head's output by the RMS of the "
                                  f"final residual stream (frozen at this run's value) before unembedding.")
            if _close(got, ((out / rms(out)) * direction.T).sum(-1), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you normalised the head's output by its own RMS. The final norm divides "
                                  f"the whole residual stream: use the RMS of `final` at the last position.")
            io_only = ((out / rms(final[:, -1])) * model.W_U[:, io].T).sum(-1)
            if _close(got, io_only, atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you projected on the IO unembedding alone; subtract the S direction.")
            other = (z[layer][:, :, head] @ model.W_O[layer, head]) / rms(final)
            if _close(got, torch.einsum("bpm,mb->b", other, direction), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you summed over every position; the metric reads the last position only.")
            expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                          hint="(z[:, -1, head] @ W_O[layer, head]) / rms(final[:, -1]) · (W_U[:, IO] - W_U[:, S]).")
    return f"{len(cases)} heads"
