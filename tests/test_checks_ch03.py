"""Chapter 03's checks: a learner-style solution passes with the hidden cases, each plausible mistake is rejected
with a message naming it, and an untouched stub is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import ablation
from utils.course.checking import run_check
from utils.checks import ch03
from utils.lens import rms
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub

ALL_CHECKS = [ch03.logit_diff_metric, ch03.zero_ablation_hook, ch03.mean_ablation_hook, ch03.resample_ablation_hook,
              ch03.last_token_kl, ch03.ablate_every_head, ch03.ablate_heads, ch03.head_direct_effect,
              ch03.component_direct_effects, ch03.self_repair]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_ten_exercises():
    from utils.checks import chapter_exercises

    assert [entry.number for entry in chapter_exercises("03").values()] == [f"3.{i}" for i in range(1, 11)]


# 3.1 ------------------------------------------------------------------------------------------------------

def _ld(logits, io, s):
    rows = torch.arange(len(io))
    return logits[rows, -1, io] - logits[rows, -1, s]


def test_logit_diff_of_log_probs_passes():
    _passes(ch03.logit_diff_metric, lambda logits, io, s: _ld(logits.log_softmax(-1), io, s))


@pytest.mark.parametrize("wrong, fragment", [
    (lambda logits, io, s: -_ld(logits, io, s), "sign"),
    (lambda logits, io, s: _ld(logits[:, :1], io, s), "position 0"),
    (lambda logits, io, s: _ld(logits, io, s).mean(), "per prompt"),
    (lambda logits, io, s: logits[:, -1, io] - logits[:, -1, s], "shape"),
    (lambda logits, io, s: logits[torch.arange(len(io)), -1, io], "subtract"),
])
def test_logit_diff_mistakes_rejected(wrong, fragment):
    _rejected(ch03.logit_diff_metric, wrong, fragment)


# 3.2 - 3.4 ------------------------------------------------------------------------------------------------

def _factory(edit, returns=True):
    def factory(*args):
        def hook(z, hook):
            edit(z, *args)
            return z if returns else None
        return hook
    return factory


def _set(z, head, value):
    z[:, :, head] = value


def test_zero_hook_in_place_without_return_passes():
    _passes(ch03.zero_ablation_hook, _factory(lambda z, h: _set(z, h, 0.0), returns=False))


@pytest.mark.parametrize("wrong, fragment", [
    (_factory(lambda z, h: z.zero_()), "other than head"),
    (_factory(lambda z, h: z[:, h].zero_()), "position"),
    (_factory(lambda z, h: z[:, -1, h].zero_()), "last position"),
    (_factory(lambda z, h: None), "unchanged"),
    (lambda head: 0.0, "hook function"),
])
def test_zero_hook_mistakes_rejected(wrong, fragment):
    _rejected(ch03.zero_ablation_hook, wrong, fragment)


def test_mean_hook_without_return_passes():
    _passes(ch03.mean_ablation_hook, _factory(lambda z, ref, h: _set(z, h, ref[:, :, h].mean(0)), returns=False))


@pytest.mark.parametrize("wrong, fragment", [
    (_factory(lambda z, ref, h: _set(z, h, 0.0)), "zeroed"),
    (_factory(lambda z, ref, h: _set(z, h, ref[:, :, h].mean((0, 1)))), "positions"),
    (_factory(lambda z, ref, h: _set(z, h, z[:, :, h].mean(0))), "activations being ablated"),
    (_factory(lambda z, ref, h: _set(z, h, ref.mean((0, 2)))), "heads too"),
    (_factory(lambda z, ref, h: z.copy_(ref.mean(0).expand_as(z))), "other than head"),
])
def test_mean_hook_mistakes_rejected(wrong, fragment):
    _rejected(ch03.mean_ablation_hook, wrong, fragment)


def test_resample_hook_passes():
    _passes(ch03.resample_ablation_hook, _factory(lambda z, donor, h: _set(z, h, donor[:, :, h])))


@pytest.mark.parametrize("wrong, fragment", [
    (_factory(lambda z, d, h: _set(z, h, d[:, :, h].mean(0))), "mean ablation"),
    (_factory(lambda z, d, h: _set(z, h, d[0, :, h])), "donor row 0"),
    (_factory(lambda z, d, h: _set(z, h, d[:, :, h].flip(0))), "shuffled"),
    (_factory(lambda z, d, h: z.copy_(d)), "other than head"),
])
def test_resample_hook_mistakes_rejected(wrong, fragment):
    _rejected(ch03.resample_ablation_hook, wrong, fragment)


# 3.5 ------------------------------------------------------------------------------------------------------

def _kl(p_logits, q_logits):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_kl_with_torch_passes():
    _passes(ch03.last_token_kl, lambda c, a: torch.nn.functional.kl_div(
        a[:, -1].log_softmax(-1), c[:, -1].log_softmax(-1), log_target=True, reduction="none").sum(-1))


@pytest.mark.parametrize("wrong, fragment", [
    (lambda c, a: _kl(a[:, -1], c[:, -1]), "KL(ablated || clean)"),
    (lambda c, a: (c[:, -1] * (c[:, -1] - a[:, -1])).sum(-1), "raw logits"),
    (lambda c, a: _kl(c[:, -1], a[:, -1]).mean(), "one number"),
    (lambda c, a: _kl(c, a), "last position"),
    (lambda c, a: _kl(c[:, 0], a[:, 0]), "position 0"),
])
def test_kl_mistakes_rejected(wrong, fragment):
    _rejected(ch03.last_token_kl, wrong, fragment)


# 3.6 ------------------------------------------------------------------------------------------------------

def _sweep(model, tokens, replacement, readout, layers=None, resid=None, *, layer_shift=0, all_heads=False,
           head_major=True, donor_row0=False, leave_hook=False):
    n_heads, batch = model.cfg.n_heads, tokens.shape[0]
    resid = ablation.resid_pre(model, tokens) if resid is None else resid
    layers = range(model.cfg.n_layers) if layers is None else layers
    rows = []
    for layer in layers:
        hooked = layer + layer_shift
        value = replacement[hooked][:1] if donor_row0 else replacement[hooked]

        def hook(z, hook):
            for head in range(n_heads):
                block = slice(head * batch, (head + 1) * batch)
                if all_heads:
                    z[block] = value
                else:
                    z[block, :, head] = value[:, :, head]
            return z

        # the mistake: copies interleaved (row b * n_heads + h) while the hook ablates blocks of rows
        inputs = resid[hooked].repeat(n_heads, 1, 1) if head_major else resid[hooked].repeat_interleave(n_heads, 0)
        final = ablation.final_resid(model, inputs, [(ablation.z_name(hooked), hook)], start_at_layer=hooked)
        rows.append(readout(final.view(n_heads, batch, *final.shape[1:])))
    if leave_hook:
        model.add_hook(ablation.z_name(0), lambda z, hook: z * 0.5)
    return torch.stack(rows)


def test_sweep_learner_style_passes():
    _passes(ch03.ablate_every_head, _sweep)


def test_sweep_from_tokens_without_start_at_layer_passes():
    def slow(model, tokens, replacement, readout, layers=None, resid=None):
        n_heads, batch = model.cfg.n_heads, tokens.shape[0]
        rows = []
        for layer in layers:
            def hook(z, hook):
                for head in range(n_heads):
                    z[head * batch:(head + 1) * batch, :, head] = replacement[layer][:, :, head]
                return z
            final = ablation.final_resid(model, tokens.repeat(n_heads, 1), [(ablation.z_name(layer), hook)])
            rows.append(readout(final.view(n_heads, batch, *final.shape[1:])))
        return torch.stack(rows)

    _passes(ch03.ablate_every_head, slow)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(layer_shift=1), "off by one"),
    (dict(all_heads=True), "all of the layer's heads"),
    (dict(head_major=False), "row [i, h, b]"),
    (dict(donor_row0=True), "donor row 0"),
    (dict(leave_hook=True), "hook was left"),
])
def test_sweep_mistakes_rejected(kwargs, fragment):
    _rejected(ch03.ablate_every_head, lambda *args, **kw: _sweep(*args, **kw, **kwargs), fragment)


def test_sweep_ignoring_layers_rejected():
    _rejected(ch03.ablate_every_head, lambda model, tokens, r, readout, layers=None, resid=None:
              _sweep(model, tokens, r, readout, layers=[0], resid=resid), "shape")


# 3.7 ------------------------------------------------------------------------------------------------------

def _several(model, tokens, heads, replacement, *, keep="all", leave=False):
    if keep == "first":
        heads = heads[:1]
    hooks = {}
    for layer, head in heads:
        def hook(z, hook, layer=layer, head=head):
            z[:, :, head] = replacement[layer][:, :, head]
            return z
        if keep == "dict":
            hooks[ablation.z_name(layer)] = hook
        else:
            hooks.setdefault(ablation.z_name(layer), []).append(hook)
    pairs = [(name, hook) for name, hook in hooks.items()] if keep == "dict" else \
        [(name, hook) for name, group in hooks.items() for hook in group]
    if leave:
        for name, hook in pairs:
            model.add_hook(name, hook)
        return model(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=pairs)


def test_ablate_heads_one_hook_per_head_passes():
    _passes(ch03.ablate_heads, _several)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(keep="first"), "only the first head"),
    (dict(keep="dict"), "same layer"),
    (dict(leave=True), "hook was left"),
])
def test_ablate_heads_mistakes_rejected(kwargs, fragment):
    _rejected(ch03.ablate_heads, lambda *args: _several(*args, **kwargs), fragment)


# 3.8 ------------------------------------------------------------------------------------------------------

def _de(model, z, final, layer, head, io, s, *, norm="final", sign=1, position=-1):
    out = z[:, position, head] @ model.W_O[layer, head]
    direction = model.W_U[:, io] - model.W_U[:, s]
    scale = {"final": rms(final[:, -1]), "own": rms(out), "none": 1.0}[norm]
    return sign * ((out / scale) * direction.T).sum(-1)


def test_direct_effect_learner_style_passes():
    _passes(ch03.head_direct_effect, _de)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(norm="none"), "final norm"),
    (dict(norm="own"), "own RMS"),
    (dict(sign=-1), "sign"),
    (dict(position=0), "differ"),
])
def test_direct_effect_mistakes_rejected(kwargs, fragment):
    _rejected(ch03.head_direct_effect, lambda *args: _de(*args, **kwargs), fragment)


# 3.9 ------------------------------------------------------------------------------------------------------

def _components(model, tokens, direction, scale=None, heads=(), replacement=None, *, frozen_ld=False,
                ignore_scale=False, no_norm=False, leave=False):
    out = ablation.component_direct_effects(model, tokens, direction, None if ignore_scale else scale, heads,
                                            replacement)
    if frozen_ld:
        out["logit_diff"] = out["embed"] + out["heads"].sum((0, 1)) + out["mlps"].sum(0)
    if no_norm:
        out["heads"] = out["heads"] * out["scale"][None, None, :, 0]
    if leave:
        model.add_hook(ablation.z_name(3), lambda z, hook: z * 0.0)
    return out


def test_components_passes():
    _passes(ch03.component_direct_effects, _components)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(frozen_ld=True), "real"),
    (dict(ignore_scale=True), "own RMS"),
    (dict(no_norm=True), "final norm"),
    (dict(leave=True), "hook was left"),
])
def test_components_mistakes_rejected(kwargs, fragment):
    _rejected(ch03.component_direct_effects, lambda *args, **kw: _components(*args, **kw, **kwargs), fragment)


# 3.10 -----------------------------------------------------------------------------------------------------

def _repair(model, tokens, layer, head, replacement, direction, *, sign=1, with_own=False, skip_mlp=False,
            no_norm=False, frozen_total=False):
    clean = ablation.component_direct_effects(model, tokens, direction)
    ablated = ablation.component_direct_effects(model, tokens, direction, clean["scale"], [(layer, head)], replacement)
    heads = ablated["heads"] - clean["heads"]
    mlps = ablated["mlps"] - clean["mlps"]
    total = ablated["logit_diff"] - clean["logit_diff"]
    frozen = heads.sum((0, 1)) + mlps.sum(0)
    out = {"total": frozen if frozen_total else total, "direct": heads[layer, head],
           "later_heads": heads[layer + 1:].sum((0, 1)) + (heads[layer, head] if with_own else 0),
           "mlps": mlps[layer + 1 if skip_mlp else layer:].sum(0), "norm": 0 * total if no_norm else total - frozen}
    return {key: sign * value for key, value in out.items()}


def test_self_repair_learner_style_passes():
    _passes(ch03.self_repair, _repair)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sign=-1), "wrong sign"),
    (dict(with_own=True), "itself"),
    (dict(skip_mlp=True), "MLP"),
    (dict(no_norm=True), "zero"),
    (dict(frozen_total=True), "frozen"),
])
def test_self_repair_mistakes_rejected(kwargs, fragment):
    _rejected(ch03.self_repair, lambda *args: _repair(*args, **kwargs), fragment)


# utils.ablation: bad input gives a clear error ----------------------------------------------------------

def test_bad_replacement_shape_is_a_clear_error(model):
    tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    with pytest.raises(ValueError, match="replacement"):
        ablation.ablate_heads(model, tokens, [(1, 2)], torch.zeros(3, 1, tokens.shape[1], 9, 64))
