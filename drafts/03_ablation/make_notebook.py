"""Draft generator for solutions/03_ablation.ipynb (not finished: see drafts/03_ablation/README.md).

Run from the repository root: .venv/bin/python drafts/03_ablation/make_notebook.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []


def md(text):
    cells.append(new_markdown_cell(text.strip("\n")))


def code(text, tags=None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    cells.append(cell)


def predict(question):
    md(f"**Predict before you compute.** {question}\n\n*Write your guess here before you run the next cell:* …")


md(r"""
# 03 — Ablation: zero, mean, resample, and self-repair

To find out what a component *does*, the most direct experiment is to take it away and see what breaks. That is
an **ablation**. But "take it away" is not one operation: you must put *something* in the head's place, and the
choice — zeros, the head's average output, or its output on another prompt — changes the answer. And even a
well-chosen ablation can hide a component's role, because later layers notice the loss and partly make up for it
(**self-repair**, or the *Hydra effect*). This chapter ablates every one of SmolLM2's 270 attention heads three
ways, on two tasks (indirect-object identification and induction on repeated tokens), compares the three maps, and
then splits each head's effect into what it writes to the output directly and what the rest of the network does
about its absence.

**By the end you will be able to…**
- write a logit-difference metric and zero-, mean- and resample-ablation hooks for one head;
- ablate every head of a model in a few batched forward passes, and read the layer × head effect maps;
- measure how far an ablation pushes activations off their usual distribution, and say when zero ablation misleads;
- compute a head's direct effect through the (frozen) final norm and compare it with its total effect;
- decompose a total effect into the head's own loss, downstream compensation and the final norm's rescaling.

*Estimated time: 1.5–2 hours.*

**Reading.** The original for self-repair:
[The Hydra Effect: Emergent Self-repair in Language Model Computations](https://arxiv.org/abs/2307.15771)
(McGrath et al., 2023). Also:
[Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small](https://arxiv.org/abs/2211.00593)
(Wang et al., 2022: the IOI task, mean ablation);
[Causal Scrubbing](https://www.lesswrong.com/posts/JvZhhzycHu2Yd57RN/causal-scrubbing-a-method-for-rigorously-testing) (Chan et al., 2022: resample ablation);
[Towards Best Practices of Activation Patching in Language Models](https://arxiv.org/abs/2309.16042) (Zhang & Nanda, 2023);
[In-context Learning and Induction Heads](https://arxiv.org/abs/2209.11895) (Olsson et al., 2022).
""")

code("# Setup placeholder: `python -m utils.build` writes this cell.", tags=["setup"])

code(r"""
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from utils import ablation
from utils.heads import head_scores, induction_scores, repeat_losses, repeated_random_tokens
from utils.ioi import make_ioi_dataset
from utils.lens import rms
from utils.models import load_model
from utils.plots import heatmap

_ = torch.manual_seed(0)
_ = torch.set_grad_enabled(False)  # forward passes only

from utils.checks import ch03 as check
""")

md(r"""
## 1. Two tasks and their metrics

**Why a metric first?** An ablation changes 49,152 logits at every position; to rank 270 heads we need one number
per run that measures *the behaviour we care about*. We use two tasks with clean, well-understood metrics.

**Indirect-object identification (IOI).** In "When Mary and John went to the store, John gave a drink to", the
answer is the name that appeared once (the indirect object, IO, *Mary*), not the repeated subject (S, *John*). The
metric is the **logit difference** logit(IO) − logit(S) at the last position: it ignores everything the model does
to other tokens and is positive when the model gets it right. The course's dataset (`utils.ioi`) has ABBA and BABA
orders with single-token names; we use one template per order so that each position plays the same role in every
prompt, which is what a *per-position* mean needs.

**Induction.** On a sequence of random tokens repeated twice, a model with induction heads predicts the second copy
from the first (chapter 02). The metric is the mean next-token loss on the repeated half.

**Budget.** Each of the 270 heads × 3 ablations × 2 tasks needs its own forward pass over every prompt, so this
chapter keeps the prompt sets tiny (the numbers below are per head, averaged over few prompts: treat small
differences as noise). The averages used for mean ablation come from larger reference sets, which cost one pass.
""")

code(r"""
model = load_model()
cfg = model.cfg
n_layers, n_heads = cfg.n_layers, cfg.n_heads

N_IOI, N_REF = 2, 32          # ablated IOI prompts (one ABBA, one BABA); reference prompts for the mean
N_REP, N_REP_REF, HALF_LEN = 1, 16, 8   # repeated-token sequences: ablated, reference; length of each copy

data = make_ioi_dataset(model, n_prompts=N_IOI, seed=0, templates_per_order=1)
reference = make_ioi_dataset(model, n_prompts=N_REF, seed=1, templates_per_order=1)
donors = make_ioi_dataset(model, n_prompts=N_IOI, seed=2, templates_per_order=1)  # same order/template per row
for prompt, donor, order in zip(data.prompts, donors.prompts, data.orders):
    print(f"{order}: {prompt!r}\n      donor: {donor!r}")
""")

md(r"""
### Exercise 3.1 — The logit difference
> Difficulty: 🔴⚪⚪⚪⚪ · Importance: 🔵🔵🔵⚪⚪ · About 5 minutes

Write `logit_diff_metric(logits, io_tokens, s_tokens)`: from logits `[batch, pos, d_vocab]` and one IO and one S
token id per prompt, return `[batch]`, logit(IO) − logit(S) at the **last** position of each prompt. Keep one value
per prompt (we average later).

<details><summary>Hint</summary>

`rows = torch.arange(batch)`; then `logits[rows, -1, io_tokens]` picks one logit per prompt. Indexing with
`logits[:, -1, io_tokens]` instead gives a `[batch, batch]` table of every prompt against every name.
</details>
""")

code(r'''
def logit_diff_metric(logits: torch.Tensor, io_tokens: torch.Tensor, s_tokens: torch.Tensor) -> torch.Tensor:
    """[batch]: logits[i, -1, io_tokens[i]] - logits[i, -1, s_tokens[i]]."""
    # BEGIN SOLUTION
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, -1, io_tokens] - logits[rows, -1, s_tokens]
    # END SOLUTION
''')

code("check.logit_diff_metric(logit_diff_metric)")

code(r"""
clean_ld = logit_diff_metric(model(data.tokens), data.io_tokens, data.s_tokens)
print("clean logit difference per prompt:", [round(v, 2) for v in clean_ld.tolist()],
      f"mean {clean_ld.mean().item():.2f}")
ref_ld = logit_diff_metric(model(reference.tokens), reference.io_tokens, reference.s_tokens)
print(f"on the {N_REF} reference prompts: mean {ref_ld.mean().item():.2f}, IO preferred in "
      f"{(ref_ld > 0).float().mean().item():.0%}")

bos_id = int(model.to_tokens("a")[0, 0])
rep_tokens = repeated_random_tokens(N_REP, HALF_LEN, low=100, high=cfg.d_vocab, bos=bos_id, seed=0)
rep_reference = repeated_random_tokens(N_REP_REF, HALF_LEN, low=100, high=cfg.d_vocab, bos=bos_id, seed=1)
rep_donors = repeated_random_tokens(N_REP, HALF_LEN, low=100, high=cfg.d_vocab, bos=bos_id, seed=2)
first_loss, clean_rep_loss = repeat_losses(model(rep_tokens), rep_tokens, HALF_LEN)
print(f"repeated tokens: loss {first_loss:.2f} nats on the first copy, {clean_rep_loss:.2f} on the second")
""")

predict("You will replace one head's output at a time, in three ways: by zeros, by its average over other "
        "prompts, and by its output on another prompt of the same template. Which of the three will change the "
        "model's output distribution the most, on average over heads? And will the three agree on which IOI heads "
        "matter most?")

md(r"""
## 2. Three ways to remove a head

**Why three?** An ablation asks "what if this head were not doing its job?", and the replacement value encodes what
"not doing its job" means:

- **Zero ablation** sets the head's output to 0. Simple, but 0 may be a value the head *never* produces: if a head
  always writes a large constant vector (many heads do, e.g. when they attend to the BOS token), zeroing it removes
  that constant too, and later layers that rely on it break — an effect that has nothing to do with the task.
- **Mean ablation** (Wang et al. 2022) replaces it by its average over a reference distribution. The constant part
  survives; only the prompt-specific information is removed. We average **per position** over reference prompts of
  the same template (the prompts are aligned, so position *p* plays the same role in all of them).
- **Resample ablation** (Chan et al. 2022) replaces it by its output on a *different* prompt of the same template
  (other names, place and object). The replacement is a value the head really produces, but it carries the wrong
  information — a stronger test than the mean, and noisier with few prompts.

We edit `blocks.{l}.attn.hook_z`, shape `[batch, pos, head, d_head]`: the head's output is `z[:, :, h] @ W_O[l, h]`
(SmolLM2 has no output bias), so replacing `z[:, :, h]` replaces everything the head writes.
""")

md(r"""
### Exercise 3.2 — Mean ablation
> Difficulty: 🔴🔴⚪⚪⚪ · Importance: 🔵🔵🔵🔵⚪ · About 10 minutes

Write `mean_ablation_hook(reference_z, head)`. `reference_z` is one layer's `hook_z` on the reference prompts,
`[n_ref, pos, n_heads, d_head]`. Return a hook function `hook(z, hook)` that sets head `head` of `z` (every prompt,
every position) to its mean over the reference prompts **at each position**, leaves the other heads alone, and
returns `z`.

<details><summary>Hint</summary>

Compute `mean = reference_z[:, :, head].mean(0)` (shape `[pos, d_head]`) once, outside the hook; inside,
`z[:, :, head] = mean` broadcasts over the batch.
</details>
""")

code(r'''
def mean_ablation_hook(reference_z: torch.Tensor, head: int):
    """A hook for blocks.{l}.attn.hook_z: head `head` -> its per-position mean over reference_z's prompts."""
    # BEGIN SOLUTION
    mean = reference_z[:, :, head].mean(0)

    def hook(z, hook):
        z[:, :, head] = mean
        return z

    return hook
    # END SOLUTION
''')

code("check.mean_ablation_hook(mean_ablation_hook)")

md(r"""
### Exercise 3.3 — Resample ablation
> Difficulty: 🔴🔴⚪⚪⚪ · Importance: 🔵🔵🔵🔵⚪ · About 10 minutes

Write `resample_ablation_hook(donor_z, head)`. `donor_z` is one layer's `hook_z` on the donor prompts, one donor per
prompt, `[batch, pos, n_heads, d_head]`. The hook replaces head `head` of row *i* by donor row *i*.

<details><summary>Hint</summary>

`z[:, :, head] = donor_z[:, :, head]`. Using the donors' mean would be mean ablation again; using donor row 0
everywhere would give every prompt the same wrong information.
</details>
""")

code(r'''
def resample_ablation_hook(donor_z: torch.Tensor, head: int):
    """A hook for blocks.{l}.attn.hook_z: head `head` of row i -> donor_z[i, :, head]."""
    # BEGIN SOLUTION
    def hook(z, hook):
        z[:, :, head] = donor_z[:, :, head]
        return z

    return hook
    # END SOLUTION
''')

code("check.resample_ablation_hook(resample_ablation_hook)")

md(r"""
Your hooks ablate one head per forward pass. For 270 heads we use the batched version in `utils.ablation` (same
replacement values): for layer *l*, the prompts are copied once per head and copy *h* ablates head *h*, so one
pass covers a whole layer. It also starts each pass at layer *l*'s residual stream (`start_at_layer`: an ablation
cannot change the blocks before it) and unembeds only the positions the metric reads. First, one head with your
hooks, against the batched version:
""")

code(r"""
z_clean, final_clean = ablation.head_z(model, data.tokens)      # [layer, batch, pos, head, d_head], [batch, pos, d]
z_ref, _ = ablation.head_z(model, reference.tokens)
z_donor, _ = ablation.head_z(model, donors.tokens)
layer, head = 20, 3
yours = {
    "mean": model.run_with_hooks(data.tokens, fwd_hooks=[(ablation.z_name(layer), mean_ablation_hook(z_ref[layer], head))]),
    "resample": model.run_with_hooks(data.tokens, fwd_hooks=[(ablation.z_name(layer), resample_ablation_hook(z_donor[layer], head))]),
}
ld_readout = ablation.ioi_readout(model, data.io_tokens, data.s_tokens)
for kind, replacement in [("mean", z_ref.mean(1, keepdim=True)), ("resample", z_donor)]:
    batched = ablation.ablate_every_head(model, data.tokens, replacement, ld_readout, layers=[layer])[0, head]
    mine = logit_diff_metric(yours[kind], data.io_tokens, data.s_tokens)
    print(f"L{layer}H{head} {kind}-ablated logit diff: your hook {mine.mean().item():.3f}, batched "
          f"{batched.mean().item():.3f}")
""")

md(r"""
Now every head, three ways, on both tasks. For IOI the readout returns two numbers per prompt: the logit
difference, and the KL divergence of the ablated next-token distribution from the clean one (at the last position),
which measures how much the ablation changes the output *in general*, not just on the task.
""")

code(r"""
clean_logp = ((final_clean[:, -1] / rms(final_clean[:, -1])) @ model.W_U + model.b_U).log_softmax(-1)


def ioi_readout(final):
    # final: [..., batch, pos, d_model] -> [..., batch, 2] = (logit difference, KL(clean || ablated) at the end)
    last = final[..., -1, :]
    logp = ((last / rms(last)) @ model.W_U + model.b_U).log_softmax(-1)
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return torch.stack([ld_readout(final), kl], dim=-1)


z_rep, _ = ablation.head_z(model, rep_tokens)
z_rep_ref, _ = ablation.head_z(model, rep_reference)
z_rep_donor, _ = ablation.head_z(model, rep_donors)
replacements = {
    "IOI": {"zero": torch.zeros_like(z_clean[:, :1]), "mean": z_ref.mean(1, keepdim=True), "resample": z_donor},
    "induction": {"zero": torch.zeros_like(z_rep[:, :1]), "mean": z_rep_ref.mean(1, keepdim=True),
                  "resample": z_rep_donor},
}
rep_readout = ablation.repeat_loss_readout(model, rep_tokens, HALF_LEN)
KINDS = ["zero", "mean", "resample"]
raw = {}
for kind in KINDS:
    raw["IOI", kind] = ablation.ablate_every_head(model, data.tokens, replacements["IOI"][kind], ioi_readout,
                                                  progress=True, desc=f"IOI, {kind} ablation")
    raw["induction", kind] = ablation.ablate_every_head(model, rep_tokens, replacements["induction"][kind],
                                                        rep_readout, progress=True, desc=f"induction, {kind} ablation")
""", tags=["nbval-ignore-output"])

code(r"""
# Effects, [layer, head], positive = the head helps the task:
ioi_effect = {k: clean_ld.mean() - raw["IOI", k][..., 0].mean(-1) for k in KINDS}   # drop in logit difference
ioi_kl = {k: raw["IOI", k][..., 1].mean(-1) for k in KINDS}                         # nats
ind_effect = {k: raw["induction", k].mean(-1) - clean_rep_loss for k in KINDS}      # rise in loss (nats)


def top_heads(effect, k=5):
    order = effect.flatten().argsort(descending=True)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


for task, effect, unit in [("IOI", ioi_effect, "drop in logit diff"), ("induction", ind_effect, "rise in loss, nats")]:
    print(f"{task} ({unit}): top 5 heads")
    for kind in KINDS:
        print(f"  {kind:>8}: " + ", ".join(f"L{l}H{h} {effect[kind][l, h].item():+.2f}" for l, h in top_heads(effect[kind])))
""")

code(r"""
for task, effect, unit in [("IOI", ioi_effect, "drop in logit(IO) - logit(S)"), ("induction", ind_effect,
                                                                                  "rise in loss (nats)")]:
    for kind in KINDS:
        heatmap(effect[kind], title=f"{task}: {kind} ablation of each head", x_label="head", y_label="layer",
                color_label=unit, diverging=True, height=420, width=520).show()
""", tags=["nbval-ignore-output"])

md(r"""
Read the maps with the printed tables beside them. On IOI a handful of late heads carry most of the effect under
every kind of ablation; on induction the largest effects sit in the middle-to-late layers where chapter 02 found
the induction heads (below we check the overlap with induction scores). Where the rows of the tables differ, the
kind of ablation is deciding the answer — section 3 measures why.
""")

code(r"""
scores = head_scores(model, rep_tokens, induction_scores, half_len=HALF_LEN)
best_l, best_h = divmod(int(scores.argmax()), n_heads)
print(f"highest induction score on this batch: L{best_l}H{best_h} ({scores.max().item():.2f})")
for kind in KINDS:
    rank = int((ind_effect[kind].flatten() > ind_effect[kind][best_l, best_h]).sum()) + 1
    print(f"  {kind:>8} ablation of it: loss {ind_effect[kind][best_l, best_h].item():+.2f} nats (rank {rank} of "
          f"{n_layers * n_heads})")
top10 = set(top_heads(scores, 10))
for kind in KINDS:
    print(f"  {kind:>8}: {len(top10 & set(top_heads(ind_effect[kind], 10)))} of the 10 top-induction-score heads are "
          f"among its 10 largest loss increases")
""")

predict("Zero ablation puts in a value of norm 0; mean ablation keeps each head's average output. For a typical "
        "head, how large is the average part of its output compared with the whole output — closer to 0%, 50% "
        "or 90%? And where will zero and mean ablation disagree most: heads with a large or a small average output?")

md(r"""
## 3. Where the ablations disagree, and why zero moves activations off distribution

**Why measure this?** If two ablations rank heads differently, at least one measures something other than "this
head's task-relevant contribution". The usual suspect is zero ablation: it removes the head's *constant* output as
well, producing a residual stream the model never saw in training. We measure, per head, at every position of the
reference prompts: the norm of the head's output `‖z W_O‖`, the norm of its mean `‖mean(z) W_O‖`, and how far each
ablation moves the head's output from its clean value (zero: the whole output; mean: `‖(z − mean) W_O‖`).
""")

code(r"""
def out_norm(z, layer):  # z: [..., n_heads, d_head] -> [..., n_heads] norm of each head's output
    return torch.einsum("...hd,hdm->...hm", z, model.W_O[layer]).norm(dim=-1)


z_body = z_ref[:, :, 1:]                      # drop BOS: [layer, n_ref, pos, head, d_head]
mean_body = z_body.mean(1, keepdim=True)
typical = torch.stack([out_norm(z_body[l], l).mean((0, 1)) for l in range(n_layers)])          # [layer, head]
mean_norm = torch.stack([out_norm(mean_body[l], l).mean((0, 1)) for l in range(n_layers)])
mean_shift = torch.stack([out_norm(z_body[l] - mean_body[l], l).mean((0, 1)) for l in range(n_layers)])
share = mean_norm / typical
print(f"mean output as a share of the typical output norm: median {share.median().item():.2f} over heads "
      f"(10%-90%: {share.flatten().quantile(0.1).item():.2f}-{share.flatten().quantile(0.9).item():.2f})")
print(f"how far the ablation moves a head's output, median over heads: zero {typical.median().item():.2f}, "
      f"mean {mean_shift.median().item():.2f} (output-norm units)")
for kind in KINDS:
    print(f"IOI, {kind:>8}: mean KL(clean || ablated) over heads {ioi_kl[kind].mean().item():.3f} nats, "
          f"max {ioi_kl[kind].max().item():.2f}")


def corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


for task, effect in [("IOI", ioi_effect), ("induction", ind_effect)]:
    print(f"{task}: correlation over heads  zero~mean {corr(effect['zero'], effect['mean']):.2f}  zero~resample "
          f"{corr(effect['zero'], effect['resample']):.2f}  mean~resample {corr(effect['mean'], effect['resample']):.2f}")
gap = (ioi_effect["zero"] - ioi_effect["mean"]).abs()
print(f"IOI: correlation of |zero - mean effect| with the head's mean-output norm: {corr(gap, mean_norm):.2f}; "
      f"with the zero-minus-mean KL: {corr(gap, ioi_kl['zero'] - ioi_kl['mean']):.2f}")
print("IOI heads where zero and mean ablation disagree most:")
for l, h in top_heads(gap, 5):
    print(f"  L{l}H{h}: zero {ioi_effect['zero'][l, h].item():+.2f}, mean {ioi_effect['mean'][l, h].item():+.2f}, "
          f"resample {ioi_effect['resample'][l, h].item():+.2f}; KL zero {ioi_kl['zero'][l, h].item():.3f} vs mean "
          f"{ioi_kl['mean'][l, h].item():.3f}; mean output share {share[l, h].item():.2f}")
""")

md(r"""
Read the printout: the share of a head's output that is its average is what zero ablation throws away *on top of*
the task information, and the KL column shows the consequence for the whole output distribution. Heads whose
output is mostly constant are where zero and mean ablation part ways; mean and resample ablation, which both keep
the head's activations on their usual distribution, tend to agree better with each other than either does with
zero (compare the correlations — with so few prompts, resample ablation is also the noisiest of the three).
""")

predict("Take the head with the largest direct effect on the IOI logit difference (what its output adds to "
        "logit(IO) − logit(S) through the unembedding). If you mean-ablate it, will the logit difference fall by its "
        "direct effect, by more, or by less?")

md(r"""
## 4. Self-repair: direct versus total effect

**Why?** An ablation measures a head's *total* effect: what it writes straight to the output, plus everything later
layers do differently because it is gone. The *direct* effect is the first part alone: the head's output at the
last position, passed through the final norm and the unembedding, projected on `W_U[:, IO] − W_U[:, S]`. The final
RMSNorm is not linear, so we **freeze its scale** at the clean run's value (`rms` of the final residual stream),
which makes the read-out linear and the direct effects of all components add up to the logit difference.
McGrath et al. (2023) found that when a layer with a large direct effect is ablated, later layers change their own
direct effects to compensate — the *Hydra effect* — and the final norm rescales too.

### Exercise 3.4 — Direct effect of a head
> Difficulty: 🔴🔴🔴⚪⚪ · Importance: 🔵🔵🔵🔵🔵 · About 15 minutes

Write `head_direct_effect(model, z, final, layer, head, io_tokens, s_tokens)`: `z` is layer `layer`'s `hook_z`
`[batch, pos, n_heads, d_head]`, `final` the residual stream after the last block `[batch, pos, d_model]` (before
the final norm). Return `[batch]`: the head's output at the last position, divided by the RMS of `final` at the
last position, dotted with `W_U[:, IO] − W_U[:, S]` for each prompt. (SmolLM2's final norm weight is folded into
`model.W_U`, and it has no output bias.)

<details><summary>Hint</summary>

`out = z[:, -1, head] @ model.W_O[layer, head]` is `[batch, d_model]`; `rms(final[:, -1])` (from `utils.lens`) is
`[batch, 1]`; `model.W_U[:, io_tokens] - model.W_U[:, s_tokens]` is `[d_model, batch]` — multiply by its transpose and
sum over `d_model`.
</details>
""")

code(r'''
def head_direct_effect(model, z: torch.Tensor, final: torch.Tensor, layer: int, head: int,
                       io_tokens: torch.Tensor, s_tokens: torch.Tensor) -> torch.Tensor:
    """[batch]: direct contribution of head (layer, head) to logit(IO) - logit(S) at the last position, through
    the final norm with its scale frozen at rms(final[:, -1])."""
    # BEGIN SOLUTION
    out = z[:, -1, head] @ model.W_O[layer, head]
    direction = model.W_U[:, io_tokens] - model.W_U[:, s_tokens]
    return ((out / rms(final[:, -1])) * direction.T).sum(-1)
    # END SOLUTION
''')

code("check.head_direct_effect(head_direct_effect)")

md(r"""
Mean ablation changes the head's output from `z` to `mean(z)`, so the *direct effect of the ablation* is the direct
effect of `z − mean(z)` (direct effects are linear in `z` once the scale is frozen). `utils.ablation.all_direct_effects`
does your computation for every head at once.
""")

code(r"""
mean_z = replacements["IOI"]["mean"]
direct = ablation.all_direct_effects(model, z_clean - mean_z, final_clean, data.io_tokens, data.s_tokens).mean(-1)
total = ioi_effect["mean"]
yours = head_direct_effect(model, z_clean[20] - mean_z[20], final_clean, 20, 3, data.io_tokens, data.s_tokens)
print(f"L20H3 direct effect of mean ablation: yours {yours.mean().item():.3f}, all_direct_effects "
      f"{direct[20, 3].item():.3f}")
print(f"correlation over heads of direct and total effect: {corr(direct, total):.2f}; "
      f"regression slope total ~ direct: {((direct * total).sum() / (direct * direct).sum()).item():.2f}")
print("heads with the largest direct effect (mean ablation), and their total effect:")
for l, h in top_heads(direct, 6):
    print(f"  L{l}H{h}: direct {direct[l, h].item():+.2f}, total {total[l, h].item():+.2f} "
          f"(total / direct {total[l, h].item() / direct[l, h].item():.2f})")
""")

code(r"""
fig = go.Figure()
labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
fig.add_trace(go.Scatter(x=direct.flatten().tolist(), y=total.flatten().tolist(), mode="markers", text=labels,
                         name="heads"))
lim = float(max(direct.abs().max(), total.abs().max())) * 1.1
fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="total = direct"))
fig.update_layout(title="Mean ablation of each head: direct vs total effect on the IOI logit difference",
                  xaxis_title="direct effect (logit difference units)", yaxis_title="total effect (logit difference units)",
                  height=450, width=600)
fig.show()
""", tags=["nbval-ignore-output"])

md(r"""
Points below the diagonal on the right are heads whose removal costs less than their direct effect: something made
up for them. Where did the compensation come from? For the top heads by direct effect we rerun the mean-ablated
model, caching every head's `hook_z` and every MLP's output, and split the change in logit difference into

- the head's own lost direct effect,
- the change in the direct effects of the **later heads** and of the **MLPs** (with the final scale frozen at the
  clean value, these add up exactly to the change in the frozen read-out),
- the rest: the **final norm's rescaling** (the ablated run's own RMS differs from the clean one).
""")

code(r"""
mlp_names = {f"blocks.{l}.hook_mlp_out" for l in range(n_layers)}
z_names = {ablation.z_name(l) for l in range(n_layers)}
direction = ablation.logit_diff_direction(model, data.io_tokens, data.s_tokens)
clean_scale = rms(final_clean[:, -1])


def frozen_de(vectors):  # [..., batch, d_model] at the last position -> [..., batch]
    return torch.einsum("...bm,mb->...b", vectors / clean_scale, direction)


_, clean_cache = model.run_with_cache(data.tokens, names_filter=lambda n: n in mlp_names)
clean_mlp = torch.stack([clean_cache[f"blocks.{l}.hook_mlp_out"][:, -1] for l in range(n_layers)])
clean_heads = torch.einsum("lbhd,lhdm->lhbm", z_clean[:, :, -1], model.W_O)
hydra = []
for l, h in top_heads(direct, 3):
    hook = ablation.mean_ablation_hook(z_ref[l], h)
    model.add_hook(ablation.z_name(l), hook)
    ablated_logits, cache = model.run_with_cache(
        data.tokens, names_filter=lambda n: n in mlp_names | z_names | {ablation.final_name(model)})
    model.reset_hooks()
    z_abl = torch.stack([cache[ablation.z_name(k)][:, -1] for k in range(n_layers)])
    heads_abl = torch.einsum("lbhd,lhdm->lhbm", z_abl, model.W_O)
    mlp_abl = torch.stack([cache[f"blocks.{k}.hook_mlp_out"][:, -1] for k in range(n_layers)])
    d_heads = frozen_de(heads_abl - clean_heads).mean(-1)          # [layer, head]
    d_mlp = frozen_de(mlp_abl - clean_mlp).mean(-1)                 # [layer]
    own = d_heads[l, h].item()
    later_heads = d_heads[l + 1:].sum().item()
    mlps = d_mlp[l:].sum().item()
    change = (logit_diff_metric(ablated_logits, data.io_tokens, data.s_tokens) - clean_ld).mean().item()
    frozen_change = frozen_de(cache[ablation.final_name(model)][:, -1] - final_clean[:, -1]).mean().item()
    hydra.append(dict(head=f"L{l}H{h}", change=change, own=own, later_heads=later_heads, mlps=mlps,
                      norm=change - frozen_change, frozen_gap=frozen_change - (own + later_heads + d_heads[l, :h].sum().item()
                                                                                + d_heads[l, h + 1:].sum().item() + mlps)))
print("| head | change in logit diff | own direct | later heads | MLPs | final-norm rescaling | compensated |")
print("|---|---|---|---|---|---|---|")
for row in hydra:
    print(f"| {row['head']} | {row['change']:+.2f} | {row['own']:+.2f} | {row['later_heads']:+.2f} | "
          f"{row['mlps']:+.2f} | {row['norm']:+.2f} | {1 - row['change'] / row['own']:.0%} |")
print(f"largest bookkeeping gap (should be ~0): {max(abs(r['frozen_gap']) for r in hydra):.3f}")
""")

md(r"""
The table answers the prediction with this model's numbers. "Compensated" is the share of the head's own direct
effect that did *not* show up in the total: positive when downstream components (or the norm) made up for the
loss, negative when they amplified it. A positive "later heads" entry alongside a negative "own direct" entry is the
Hydra effect: other heads raising their contribution when one is removed. Compare the sizes honestly: with two
prompts, an entry smaller than about 0.1 is not distinguishable from noise.
""")

predict("McGrath et al. saw compensation of a large share of a layer's direct effect in a 7B-parameter model. "
        "SmolLM2 has 135M parameters: do you expect more, less, or about the same self-repair?")

md(r"""
## 5. Replication

The published observations beside what this notebook computed on SmolLM2-135M-Instruct (numbers are read from the
variables above, so they match the run). All published results were on other models (GPT-2 small for Wang et al.
and Zhang & Nanda, Chinchilla 7B for McGrath et al., small attention-only and larger models for Olsson et al.), with
many more prompts than the handful we can afford here.
""")

code(r"""
top_hydra = hydra[0]
ind_top = top_heads(ind_effect["mean"], 1)[0]
rows = [
    ("Wang et al. 2022: in GPT-2 small a few late heads (name movers) carry IOI; mean-ablating one lowers the logit "
     "difference substantially",
     f"clean logit diff {clean_ld.mean().item():.2f}; largest mean-ablation drop "
     + ", ".join(f"L{l}H{h} {ioi_effect['mean'][l, h].item():+.2f}" for l, h in top_heads(ioi_effect["mean"], 3)),
     "Same picture of a few late heads mattering; the head classes themselves are chapter 04's subject, and two "
     "prompts per head make the exact ranking noisy."),
    ("Zhang & Nanda 2023: zero ablation can disagree with distribution-preserving ablations (it moves activations "
     "off distribution)",
     f"IOI effect correlations zero~mean {corr(ioi_effect['zero'], ioi_effect['mean']):.2f}, mean~resample "
     f"{corr(ioi_effect['mean'], ioi_effect['resample']):.2f}; mean KL zero {ioi_kl['zero'].mean().item():.3f} vs "
     f"mean {ioi_kl['mean'].mean().item():.3f} nats; median mean-output share {share.median().item():.2f}",
     "Consistent in direction: zero ablation changes the output distribution more than mean ablation. How much "
     "the *rankings* differ depends on the task (see the correlations)."),
    ("Olsson et al. 2022: ablating induction heads raises the loss on repeated tokens",
     f"clean second-copy loss {clean_rep_loss:.2f} nats; top mean-ablation rise L{ind_top[0]}H{ind_top[1]} "
     f"{ind_effect['mean'][ind_top].item():+.2f}; top induction-score head L{best_l}H{best_h}: "
     f"{ind_effect['mean'][best_l, best_h].item():+.2f}",
     "Single heads move the loss by little in SmolLM2: induction is spread over several heads, so ablating one "
     "leaves the others to do the job (itself a kind of redundancy)."),
    ("McGrath et al. 2023 (Hydra effect): ablating a component with a large direct effect is partly compensated "
     "downstream",
     f"{top_hydra['head']}: own direct {top_hydra['own']:+.2f}, total {top_hydra['change']:+.2f}, later heads "
     f"{top_hydra['later_heads']:+.2f}, MLPs {top_hydra['mlps']:+.2f}, norm {top_hydra['norm']:+.2f}; slope of total "
     f"on direct over all heads {((direct * total).sum() / (direct * direct).sum()).item():.2f}",
     "McGrath et al. ablated whole layers of a 7B model over many prompts; we ablate single heads of a 135M model on "
     "two prompts, so read the sign and rough size, not the digits."),
]
print("| published | this notebook (SmolLM2-135M-Instruct) | where they differ |")
print("|---|---|---|")
for published, ours, note in rows:
    print(f"| {published} | {ours} | {note} |")
""")

md(r"""
## Where next

- Chapter 04 patches activations between clean and corrupted IOI prompts instead of ablating them, and identifies
  the head classes behind the effects mapped here.
- Rerun section 2 with more prompts (raise `N_IOI`) if you have the time budget: the rankings stabilise, the
  correlations between ablation kinds change, and the self-repair numbers become trustworthy to the second digit.
""")

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
out = Path("solutions/03_ablation.ipynb")
out.parent.mkdir(exist_ok=True)
nbformat.write(nb, out)
print(f"wrote {out} ({len(cells)} cells)")
