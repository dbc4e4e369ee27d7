"""Plotting helpers: plotly figures and circuitsvis attention views that render in JupyterLab, Colab and offline.

Figures are sent as plotly's JSON mimetype (JupyterLab and VS Code draw it with the plotly extension that
ships in the `plotly` package; Colab gets its own renderer), so notebooks never embed plotly.js itself.
"""

from __future__ import annotations

import sys

import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
import torch

pio.renderers.default = "colab" if "google.colab" in sys.modules else "plotly_mimetype"


def _numpy(values):
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return values


def heatmap(values, *, title: str, x_label: str, y_label: str, x_ticks=None, y_ticks=None,
            color_label: str = "", text=None, diverging: bool = False, **layout) -> go.Figure:
    """A labelled heatmap of a 2-D tensor (rows = y, columns = x). `text` adds a label in each cell."""
    values = _numpy(values)
    figure = px.imshow(
        values,
        x=list(x_ticks) if x_ticks is not None else None,
        y=list(y_ticks) if y_ticks is not None else None,
        color_continuous_scale="RdBu" if diverging else "Viridis",
        color_continuous_midpoint=0.0 if diverging else None,
        labels={"x": x_label, "y": y_label, "color": color_label},
        aspect="auto",
        title=title,
    )
    if text is not None:
        figure.update_traces(text=text, texttemplate="%{text}", textfont_size=9)
    figure.update_layout(**layout)
    return figure


def lines(series: dict, *, x=None, title: str, x_label: str, y_label: str, log_y: bool = False, **layout) -> go.Figure:
    """Several named lines on one set of axes: `series` maps a legend name to a 1-D tensor or list."""
    figure = go.Figure()
    for name, values in series.items():
        values = _numpy(values)
        figure.add_trace(go.Scatter(x=x if x is not None else list(range(len(values))), y=values, name=name,
                                    mode="lines+markers"))
    figure.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, **layout)
    if log_y:
        figure.update_yaxes(type="log")
    return figure


def attention_view(pattern: torch.Tensor, tokens: list[str], head_names: list[str] | None = None):
    """circuitsvis's interactive attention view for a [n_heads, query_pos, key_pos] pattern.

    Offline it inlines its JavaScript (about 1 MB); `python -m utils.build` strips such outputs from the
    committed notebooks, so the repository stays small.
    """
    import circuitsvis as cv

    if pattern.ndim != 3:
        raise ValueError(f"attention_view expects a [n_heads, query_pos, key_pos] tensor, got shape "
                         f"{tuple(pattern.shape)}. Select one prompt first, e.g. cache['pattern', 0][0].")
    if pattern.shape[-1] != len(tokens):
        raise ValueError(f"{len(tokens)} tokens given for a pattern over {pattern.shape[-1]} positions.")
    return cv.attention.attention_heads(attention=_numpy(pattern), tokens=tokens, attention_head_names=head_names)
