"""Static heatmaps (matplotlib, the ``plot`` extra) for papers and slides."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnkit._checks import describe, require_int
from attnkit._plot import pyplot
from attnkit.inspect import rollout as roll_out
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.viz.report import _check_maps, _check_progress, _sides, has_whole_model

if TYPE_CHECKING:  # matplotlib is optional (the plot extra)
    from matplotlib.axes import Axes

__all__ = ["save_alignment_png", "save_pngs"]

_LABELLED = 48  # up to this many tokens, axes carry the tokens


def _heatmap(ax: Axes, grid: torch.Tensor, tokens: list[str], title: str, *, labels: bool,
             keys: list[str] | None = None) -> object:
    """Rows are ``tokens`` (queries), columns ``keys`` (default: the same tokens)."""
    image = ax.imshow(grid.float().numpy(), cmap="magma_r", vmin=0.0, vmax=1.0, interpolation="nearest",
                      aspect="equal")
    ax.set_title(title, fontsize=9)
    if labels:
        keys = tokens if keys is None else keys
        ax.set_xticks(range(len(keys)))
        ax.set_yticks(range(len(tokens)))
        ax.set_xticklabels([t.replace("$", r"\$") for t in keys], rotation=90, fontsize=6)  # not mathtext
        ax.set_yticklabels([t.replace("$", r"\$") for t in tokens], fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def save_pngs(
    maps: AttentionMaps,
    directory: str | os.PathLike,
    input_index: int = 0,
    *,
    dpi: int = 150,
    rollout: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Path]:
    """Write heatmaps of one input's maps into ``directory`` (created if needed).

    Files: ``layer{L}.png`` (every head of layer L, one panel each), ``mean.png`` (the mean
    over heads, one panel per layer) and, when the maps hold the whole model,
    ``rollout.png``. Queries run down, keys across; the colour scale is 0..1 in every
    panel. Axes carry the tokens up to 48 tokens.

    ``rollout=False`` leaves the rollout out: pass it when the maps hold heads 0..k-1 of a
    bigger model, which they cannot tell from the whole model.

    Returns:
        The paths written, in that order.
    """
    index = _check_maps(maps, input_index)
    _check_progress(progress)
    dpi = require_int("dpi", dpi, minimum=10)
    if not isinstance(rollout, bool):
        raise TypeError(f"rollout must be a bool; got {describe(rollout)}")
    out = _folder(directory)
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    attn = maps.attentions[index]
    tokens, keys = _sides(maps, index)
    n_layers, _, lq, lk = attn.shape
    grid = _Grid(plt, tokens, keys, labels=max(lq, lk) <= _LABELLED, dpi=dpi)
    written: list[Path] = []
    for li, layer in enumerate(maps.layers):
        panels = [(attn[li, hi], f"L{layer} H{head}") for hi, head in enumerate(maps.heads)]
        written.append(grid.save(panels, f"{maps.model_name} · layer {layer} · {lq} tokens", out / f"layer{layer}.png"))
        if progress:
            progress("PNG heatmaps", li + 1, n_layers + 1)
    panels = [(attn[li].float().mean(0), f"layer {layer}, mean of heads") for li, layer in enumerate(maps.layers)]
    written.append(grid.save(panels, f"{maps.model_name} · mean over heads · {lq} tokens", out / "mean.png"))
    if rollout and keys is None and has_whole_model(maps):
        fig, ax = plt.subplots(figsize=(6, 6))
        image = _heatmap(ax, roll_out(maps, input_index=index, dtype=torch.float32), tokens,
                         f"{maps.model_name} · attention rollout over {n_layers} layers", labels=grid.labels)
        fig.colorbar(image, ax=ax, shrink=0.7, label="share of input token")
        written.append(_saved(plt, fig, out / "rollout.png", dpi))
    if progress:
        progress("PNG heatmaps", n_layers + 1, n_layers + 1)
    return written


def _folder(directory: object) -> Path:
    """``directory`` as a Path to a folder (which may not exist yet); TypeError/ValueError otherwise."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike; got {describe(directory)}")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"directory must be a folder; {str(out)!r} is a file")
    return out


def _saved(plt: Any, fig: Any, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


@dataclass(frozen=True)
class _Grid:
    """Figures of heatmap panels, up to 6 a row, one colour scale 0..1 for all."""

    plt: Any
    tokens: list[str]
    keys: list[str] | None
    labels: bool
    dpi: int

    def save(self, panels: list[tuple[Tensor, str]], title: str, path: Path) -> Path:
        cols = min(len(panels), 6)
        rows = -(-len(panels) // cols)
        size = 3.2 if self.labels else 2.4
        fig, axes = self.plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.6), squeeze=False)
        for n, (values, name) in enumerate(panels):
            image = _heatmap(axes[n // cols][n % cols], values, self.tokens, name, labels=self.labels, keys=self.keys)
        for extra in range(len(panels), rows * cols):
            axes[extra // cols][extra % cols].axis("off")
        fig.suptitle(title, fontsize=11)
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
        return _saved(self.plt, fig, path, self.dpi)


def save_alignment_png(
    maps: Seq2SeqMaps | AttentionMaps,
    path: str | os.PathLike,
    input_index: int = 0,
    *,
    layer: int | None = None,
    heads: list[int] | None = None,
    dpi: int = 150,
) -> Path:
    """Write the alignment heatmap of one input's cross-attention to ``path`` (a PNG).

    Rows are the target tokens (queries), columns the source tokens (keys); each cell is the
    mean over ``heads`` of ``layer``'s weights, on a 0..1 colour scale. Axes carry the tokens
    up to 48 of them.

    Args:
        maps: a :class:`~attnkit.inspect.Seq2SeqMaps` (its ``cross`` maps are drawn) or
            cross-attention :class:`~attnkit.inspect.AttentionMaps`.
        layer: model index of the layer (default: the last captured).
        heads: model indices of the heads to average (default: all captured).

    Returns:
        The path written.
    """
    cross = maps.cross if isinstance(maps, Seq2SeqMaps) else maps
    index = _check_maps(cross, input_index)
    dpi = require_int("dpi", dpi, minimum=10)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {describe(path)}")
    chosen = cross.select(layers=cross.layers[-1] if layer is None else layer, heads=heads)
    grid = chosen.attentions[index][0].double().mean(0)  # (T, S)
    tokens, keys = _sides(cross, index)
    plt = pyplot()
    labels = max(grid.shape) <= _LABELLED
    fig, ax = plt.subplots(figsize=(max(3.0, 0.28 * grid.shape[1] + 1.6), max(3.0, 0.28 * grid.shape[0] + 1.2)))
    named = "all heads" if heads is None else "heads " + ",".join(map(str, chosen.heads))
    image = _heatmap(ax, grid, tokens, f"{cross.model_name} · layer {chosen.layers[0]}, mean of {named}",
                     labels=labels, keys=keys)
    ax.set_xlabel("source (keys)", fontsize=8)
    ax.set_ylabel("target (queries)", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.7, label="attention weight")
    out = Path(path)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out
