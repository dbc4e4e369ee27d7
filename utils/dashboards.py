"""An offline feature browser for sparse-autoencoder latents: a page per latent and an ipywidgets labeller.

A latent's page shows what a reader needs to guess its meaning (Bricken et al. 2023's dashboards, reduced):
its firing rate, its top-activating contexts with the activating token highlighted, a histogram of its positive
activations, and the tokens its decoder direction promotes through the unembedding.

    stats = dashboard_statistics(latent_acts, tokens, direction, W_U, n_top=8, window=8, n_bins=20)
    display(latent_page(model, latent, stats))               # one latent, as HTML
    browser = LatentLabeller(model, latents, stats_for)      # a widget: step through latents, type labels
    browser.labels                                           # {latent: {"label": ..., "interpretable": ...}}
"""

from __future__ import annotations

import html
from typing import Callable

import torch

from utils.sae import activation_histogram, promoted_tokens, top_activations


def dashboard_statistics(latent_acts: torch.Tensor, tokens: torch.Tensor, direction: torch.Tensor,
                         W_U: torch.Tensor, n_top: int, window: int, n_bins: int) -> dict:
    """Everything a latent's page shows, from its activations `latent_acts` [n_seq, seq_len] on `tokens`
    [n_seq, seq_len], its decoder direction [d_model] and the unembedding W_U [d_model, vocab]:

    "firing_rate": the fraction of positions where the latent is active (a float);
    "top_values":  its n_top largest (positive) activations, largest first, a tensor [m];
    "contexts":    for each, the token ids tokens[seq, pos - window : pos + window + 1], cut at the sequence's
                   start and end (a list of m lists of ints);
    "highlight":   for each, the index of the activating token inside its context (a list of m ints);
    "histogram":   counts [n_bins] of its positive activations in n_bins equal bins from 0 to its maximum;
    "promoted":    the n_top token ids its direction pushes up most through W_U (a tensor [n_top]).
    """
    values, seqs, positions = top_activations(latent_acts, n_top)
    contexts, highlight = [], []
    for seq, pos in zip(seqs.tolist(), positions.tolist()):
        start, stop = max(0, pos - window), min(tokens.shape[1], pos + window + 1)
        contexts.append(tokens[seq, start:stop].tolist())
        highlight.append(pos - start)
    counts, _ = activation_histogram(latent_acts.flatten(), n_bins)
    return {"firing_rate": float((latent_acts > 0).float().mean()), "top_values": values, "contexts": contexts,
            "highlight": highlight, "histogram": counts, "promoted": promoted_tokens(direction, W_U, n_top)[0]}


def _token_html(text: str) -> str:
    return html.escape(text.replace("\n", "⏎"))


def latent_page(model, latent: int, stats: dict, label: str = ""):
    """One latent's page as an IPython HTML object (plain HTML: renders in JupyterLab, Colab and VS Code)."""
    from IPython.display import HTML

    top = float(stats["top_values"][0]) if len(stats["top_values"]) else 0.0
    rows = []
    for value, context, where in zip(stats["top_values"].tolist(), stats["contexts"], stats["highlight"]):
        pieces = []
        for index, token in enumerate(context):
            text = _token_html(model.to_string([token]))
            if index == where:
                pieces.append(f"<b style='background:rgba(255,140,0,{0.25 + 0.75 * value / max(top, 1e-9):.2f})'>"
                              f"{text}</b>")
            else:
                pieces.append(text)
        rows.append(f"<tr><td style='text-align:right;padding-right:8px'>{value:.1f}</td>"
                    f"<td style='font-family:monospace;white-space:pre-wrap'>{''.join(pieces)}</td></tr>")
    counts = stats["histogram"].tolist()
    peak = max(counts) if counts and max(counts) > 0 else 1
    bars = "".join(f"<div title='{int(c)}' style='display:inline-block;width:8px;margin-right:1px;"
                   f"height:{2 + 48 * c / peak:.0f}px;background:#4a7'></div>" for c in counts)
    promoted = ", ".join(f"<code>{_token_html(model.to_string([t]))}</code>" for t in stats["promoted"].tolist())
    title = f"Latent {latent}" + (f" — {html.escape(label)}" if label else "")
    return HTML(
        f"<div style='border:1px solid #ccc;padding:8px;margin:4px 0'><h4 style='margin:0'>{title}</h4>"
        f"<p style='margin:2px 0'>fires on {100 * stats['firing_rate']:.2f}% of tokens; max activation {top:.1f}</p>"
        f"<table>{''.join(rows)}</table>"
        f"<p style='margin:4px 0 0'>positive activations, 0 to max:</p><div style='display:flex;align-items:flex-end;"
        f"height:52px'>{bars}</div><p style='margin:4px 0 0'>promotes: {promoted}</p></div>")


def latent_text(model, latent: int, stats: dict, n_contexts: int = 4) -> str:
    """A short plain-text page (for printed, compared outputs): top contexts with the token in [[ ]]."""
    lines = [f"latent {latent}: fires on {100 * stats['firing_rate']:.2f}% of tokens; promotes "
             + " ".join(repr(model.to_string([t])) for t in stats["promoted"][:6].tolist())]
    for value, context, where in list(zip(stats["top_values"].tolist(), stats["contexts"], stats["highlight"]))[:n_contexts]:
        text = "".join(f"[[{model.to_string([t])}]]" if i == where else model.to_string([t])
                       for i, t in enumerate(context))
        lines.append(f"  {value:6.1f}  {' '.join(text.split())}")
    return "\n".join(lines)


class LatentLabeller:
    """An ipywidgets browser: one latent's page at a time, a label box, an interpretable yes/no/unsure choice,
    Previous / Next buttons. Labels are kept in `.labels` as {latent: {"label": str, "interpretable": str}}."""

    CHOICES = ("unlabelled", "yes", "no", "unsure")

    def __init__(self, model, latents: list[int], stats_for: Callable[[int], dict], labels: dict | None = None):
        import ipywidgets as widgets

        self.model, self.latents, self.stats_for = model, list(latents), stats_for
        self.labels = labels if labels is not None else {}
        self.index = 0
        self.page = widgets.Output()
        self.label_box = widgets.Text(description="label", placeholder="what does it fire on?")
        self.choice = widgets.ToggleButtons(options=self.CHOICES, description="readable?")
        self.position = widgets.Label()
        previous_button, next_button = widgets.Button(description="◀ previous"), widgets.Button(description="next ▶")
        previous_button.on_click(lambda _: self._move(-1))
        next_button.on_click(lambda _: self._move(+1))
        self.widget = widgets.VBox([widgets.HBox([previous_button, next_button, self.position]), self.label_box,
                                    self.choice, self.page])
        self._show()

    def _save(self) -> None:
        latent = self.latents[self.index]
        if self.label_box.value or self.choice.value != "unlabelled":
            self.labels[latent] = {"label": self.label_box.value, "interpretable": self.choice.value}

    def _move(self, step: int) -> None:
        self._save()
        self.index = (self.index + step) % len(self.latents)
        self._show()

    def _show(self) -> None:
        from IPython.display import display

        latent = self.latents[self.index]
        saved = self.labels.get(latent, {})
        self.label_box.value = saved.get("label", "")
        self.choice.value = saved.get("interpretable", "unlabelled")
        self.position.value = f"latent {latent} ({self.index + 1} of {len(self.latents)})"
        self.page.clear_output()
        with self.page:
            display(latent_page(self.model, latent, self.stats_for(latent)))

    def summary(self) -> dict:
        """How many latents were labelled, and how many of them interpretable."""
        self._save()
        marked = [entry["interpretable"] for entry in self.labels.values()]
        return {"labelled": len(marked), "yes": marked.count("yes"), "no": marked.count("no"),
                "unsure": marked.count("unsure")}

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
