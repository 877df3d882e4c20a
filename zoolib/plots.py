"""Matplotlib figures shared by the notebooks; each can be saved as a PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from .workspace import write_atomic


def save(fig, path: str | Path | None):
    """Lay the figure out and, given a path, write it as a PNG (whole or not at all:
    `workspace.write_atomic`); returns the figure. The one figure saver of zoolib."""
    fig.tight_layout()
    if path is not None:
        write_atomic(path, write=lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return fig


def class_counts(table: pd.DataFrame, min_images: int, path: str | Path | None = None):
    """Horizontal bars of the images per class the cutoff counts, coloured by it.

    Args:
        table: from `library.cutoff_table`.
        min_images: the cutoff, drawn as a line.
        path: where to save the PNG (optional).
    """
    t = table.sort_values("eligible")
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(t) + 1.2))
    colours = ["tab:green" if inc else "tab:gray" for inc in t["included"]]
    ax.barh(t["label"], t["eligible"], color=colours)
    staged = t["staged"] + t["synthetic"]
    ax.barh(t["label"], staged, color="tab:orange", alpha=0.7, label="staged or synthetic")
    ax.axvline(min_images, color="tab:red", ls="--", label=f"MIN_IMAGES = {min_images}")
    ax.set_xlabel("unique readable images, not discarded")
    ax.legend(loc="lower right")
    ax.set_title("Images per class (grey: not trained)")
    return save(fig, path)


def history(hist: pd.DataFrame, title: str = "", path: str | Path | None = None,
            plateau_epoch: int | None = None, anneal_start: int | None = None,
            best_epoch: int | None = None):
    """Loss and accuracy per epoch of a training run, with its schedule marked.

    Args:
        hist: history.csv's rows (epoch, train_loss, valid_loss, accuracy).
        plateau_epoch: drawn as a dotted line (where validation stopped improving).
        anneal_start: the annealed epochs are shaded.
        best_epoch: the kept epoch, drawn as a star on the accuracy curve.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(hist["epoch"], hist["train_loss"], "o-", label="train")
    ax1.plot(hist["epoch"], hist["valid_loss"], "o-", label="valid")
    ax1.set_xlabel("epoch"); ax1.set_ylabel("loss")
    ax2.plot(hist["epoch"], hist["accuracy"], "o-", color="tab:green")
    ax2.set_xlabel("epoch"); ax2.set_ylabel("valid accuracy"); ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        if plateau_epoch:
            ax.axvline(plateau_epoch, color="gray", ls=":", label="plateau")
        if anneal_start:
            ax.axvspan(anneal_start - 0.5, hist["epoch"].max() + 0.5, color="tab:blue",
                       alpha=0.08, label="anneal")
    if best_epoch:
        ax2.plot([best_epoch], [hist["accuracy"].iloc[best_epoch - 1]], "*", ms=14,
                 color="tab:red", label="kept")
    ax1.legend(); ax2.legend(loc="lower right")
    fig.suptitle(title)
    return save(fig, path)
