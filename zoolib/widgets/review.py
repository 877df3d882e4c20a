"""A review widget: look at served predictions one by one and mark them.

A thin ipywidgets layer over `translog.pick_for_review` and
`translog.record_evaluation`: each mark is one evaluation row attached to the
original transaction, however long after the prediction it is made.

    from zoolib.widgets import ReviewWidget
    ReviewWidget(WORKSPACE, reviewer="anna", mode="unreviewed")
"""
from __future__ import annotations

import ipywidgets as w
import pandas as pd

from .. import translog
from ..workspace import UNKNOWN, Workspace, ZoolibError, open_workspace
from .grid import Item, ThumbGrid

SIZE = 224


class ReviewWidget(w.VBox):
    """Show transactions with their image, prediction and top-5; mark each one.

    Args:
        workspace: the workspace.
        reviewer: the name stored with each evaluation.
        n: how many transactions to review.
        mode: "recent", "sample" or "unreviewed" (see `translog.pick_for_review`).
        seed: for "sample".
        classes: choices for the true class; by default every class predicted
            so far, plus "Unknown".
    """

    def __init__(self, workspace, reviewer: str, n: int = 12, mode: str = "unreviewed",
                 seed: int = 0, classes: list[str] | None = None):
        self.ws: Workspace = open_workspace(workspace)
        self.rows: pd.DataFrame = translog.pick_for_review(self.ws, n, mode, seed)
        self.position = 0
        choices = classes or sorted({c for top in self.rows["top5"] for c, _ in top})
        self.reviewer = w.Text(value=reviewer, description="reviewer")
        self.grid = ThumbGrid(1, SIZE, columns=1)  # the shared grid, one large tile
        self.info = w.HTML()
        self.true_class = w.Combobox(options=choices + [UNKNOWN], description="true class",
                                     placeholder="type or pick")
        self.correct = w.Button(description="Correct", button_style="success")
        self.wrong = w.Button(description="Wrong: true class", button_style="danger")
        self.skip = w.Button(description="Skip")
        self.status = w.HTML()
        self.correct.on_click(lambda _: self.mark(True))
        self.wrong.on_click(lambda _: self.mark(False))
        self.skip.on_click(lambda _: self.show(self.position + 1))
        buttons = w.HBox([self.correct, self.true_class, self.wrong, self.skip])
        super().__init__([self.reviewer, w.HBox([self.grid.widget, self.info]), buttons,
                          self.status])
        self.show(0)

    def show(self, position: int) -> None:
        """Display the transaction at `position` (or say that the list is done)."""
        self.position = position
        if position >= len(self.rows):
            self.info.value = ("<b>Nothing (more) to review.</b>" if len(self.rows) else
                               "<b>No transactions to review yet.</b>")
            for button in (self.correct, self.wrong, self.skip):
                button.disabled = True
            return
        row = self.rows.iloc[position]
        path = self.ws.root / row["image"] if isinstance(row["image"], str) else None
        kept = path is not None and path.is_file()
        self.grid.show([Item(str(row["id"]), str(path), f"#{row['id']}: {row['predicted']}")]
                       if kept else [])
        top = "".join(f"<li>{c}: {p:.2f}</li>" for c, p in row["top5"])
        seen = "" if kept else " (no image kept)"
        self.info.value = (f"<b>#{row['id']}</b> {row['time']:%Y-%m-%d %H:%M} UTC, "
                           f"{row['generation']}, source {row['source']}{seen}<br>"
                           f"predicted <b>{row['predicted']}</b> ({row['confidence']:.2f})"
                           f"<ol>{top}</ol>{position + 1} of {len(self.rows)}")
        self.true_class.value = ""

    def mark(self, correct: bool) -> int | None:
        """Record the verdict on the shown transaction and move on; returns the row id."""
        if self.position >= len(self.rows):
            return None
        row = self.rows.iloc[self.position]
        true_class = row["predicted"] if correct else self.true_class.value.strip() or None
        try:
            eid = translog.record_evaluation(self.ws, int(row["id"]), self.reviewer.value,
                                             correct=correct, true_class=true_class)
        except ZoolibError as exc:
            self.status.value = f"<span style='color:red'>{exc}</span>"
            return None
        self.status.value = f"saved evaluation {eid} for transaction {row['id']}"
        self.show(self.position + 1)
        return eid
