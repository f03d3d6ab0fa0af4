"""A review panel for Jupyter: show a flagged radiograph, let the inspector click its class.

Chapter: "Monitoring in production", section *human-in-the-loop review of flagged predictions* (Lab 3 labels items
with it). The panel is a thin view over :class:`~reference_impl.monitoring.review.ReviewQueue`: every click is one
queue operation, so the guarantees (one claimant per item, one label per item, durable labels) hold whether the
inspector uses this panel, the CLI or both.

    from reference_impl.monitoring.review import ReviewQueue
    from reference_impl.monitoring.review_widget import ReviewPanel
    panel = ReviewPanel(ReviewQueue(settings), reviewer="ana", classes=["good", "porosity", "crack", "lack_of_fusion"])
    panel  # displays itself in the notebook

ipywidgets is imported when a panel is created, not when this module is imported.
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .review import Item, ReviewError, ReviewQueue

log = logging.getLogger(__name__)

BROWSER_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif"}


def image_bytes(path: str | Path) -> tuple[bytes, str]:
    """The stored image as bytes a browser can show, and their format (``png``, ``jpeg``...).

    PNG and JPEG go through unchanged (16-bit PNGs too: browsers scale them). Anything else (TIFF, raw) is
    converted to an 8-bit PNG with Pillow, scaling 16-bit data to the 0-255 range so dark images stay visible.
    """
    path = Path(path)
    fmt = BROWSER_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        return path.read_bytes(), fmt
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "RGB", "RGBA"):
            arr = np.asarray(im).astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            im = Image.fromarray(scaled.round().astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue(), "png"


class ReviewPanel:
    """Image + prediction + one button per class + Skip + a status line ("12 labelled, 30 pending").

    Clicking a class labels the current item through the queue and loads the next one the reviewer holds or can
    claim. ``classes`` defaults to the queue's classes. Display it by leaving it as the last line of a cell.
    """

    def __init__(
        self,
        queue: ReviewQueue,
        reviewer: str,
        classes: Sequence[str] | None = None,
        *,
        lease_s: float = 600.0,
        image_width: int = 256,
    ) -> None:
        import ipywidgets as widgets  # lazy: the server and CLI never need it

        self.queue = queue
        self.reviewer = reviewer
        self.lease_s = lease_s
        classes = tuple(classes) if classes is not None else queue.classes
        if not classes:
            raise ReviewError("the panel needs the class names: pass classes=[...] or give the queue its classes")
        self.classes = classes
        self.current: Item | None = None
        self.labelled_here = 0  # labels given through this panel (the status line shows the queue's totals)

        self.image = widgets.Image(format="png", width=image_width)
        self.no_image = widgets.HTML()
        self.info = widgets.HTML()
        self.buttons = {name: widgets.Button(description=name, tooltip=f"label as {name}") for name in classes}
        for name, button in self.buttons.items():
            button.on_click(lambda _b, name=name: self.label(name))
        self.skip_button = widgets.Button(description="Skip", button_style="warning", tooltip="no label; next item")
        self.skip_button.on_click(lambda _b: self.skip())
        self.message = widgets.HTML()
        self.status = widgets.Label()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.image, self.no_image]),
                self.info,
                widgets.HBox([*self.buttons.values(), self.skip_button]),
                self.message,
                self.status,
            ]
        )
        self.next_item()

    # Jupyter displays the object through its widget.
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- actions (the button handlers; callable directly, e.g. from tests) ------------------------------------
    def label(self, name: str) -> None:
        """Label the current item ``name`` and move on."""
        if self.current is None:
            self.message.value = "Nothing to label: the queue is empty."
            return
        try:
            self.queue.label(self.current.id, self.reviewer, name)
        except ReviewError as exc:
            # e.g. the lease expired and another inspector took the item: say so, then move on.
            self._say(str(exc), error=True)
        else:
            self.labelled_here += 1
            self._say(f"Item {self.current.id} labelled {name}.")
        self.next_item()

    def skip(self) -> None:
        """Skip the current item (no label) and move on."""
        if self.current is None:
            return
        try:
            self.queue.skip(self.current.id, self.reviewer, note="skipped in the review panel")
        except ReviewError as exc:
            self._say(str(exc), error=True)
        else:
            self._say(f"Item {self.current.id} skipped.")
        self.next_item()

    def next_item(self) -> Item | None:
        """Show the next item: one the reviewer already holds, else a newly claimed one, else "queue empty"."""
        held = self.queue.my_claims(self.reviewer)
        claimed = held or self.queue.claim(self.reviewer, n=1, lease_s=self.lease_s)
        self.current = claimed[0] if claimed else None
        self._show(self.current)
        self.refresh_status()
        return self.current

    def refresh_status(self) -> str:
        stats = self.queue.stats()
        self.status.value = f"{stats['labelled']} labelled, {stats['pending']} pending"
        return self.status.value

    # -- view -----------------------------------------------------------------------------------------------
    def _show(self, item: Item | None) -> None:
        enabled = item is not None
        for button in (*self.buttons.values(), self.skip_button):
            button.disabled = not enabled
        if item is None:
            self.image.value = b""
            self.no_image.value = ""
            self.info.value = "<b>The review queue is empty.</b> Thank you!"
            return
        self.image.value, self.no_image.value = b"", ""
        if item.image_path is None:
            self.no_image.value = "<i>image not stored (the server ran without image storage)</i>"
        else:
            try:
                data, fmt = image_bytes(item.image_path)
                self.image.format = fmt  # format first, so the browser never decodes bytes with the wrong one
                self.image.value = data
            except OSError as exc:  # file deleted or unreadable: the reviewer can still skip it
                self.no_image.value = f"<i>cannot show the image: {html.escape(str(exc))}</i>"
        # An item queued by hand (not from the prediction log) may lack the model version, prediction or
        # confidence: say only what is known rather than "model None predicted None".
        who = "the model" if item.model_version is None else f"model {html.escape(str(item.model_version))}"
        said = (f"{who} predicted <b>{html.escape(str(item.predicted_label))}</b>"
                if item.predicted_label is not None else "no model prediction recorded")  # fmt: skip
        if item.predicted_label is not None and item.confidence is not None:
            said += f" with confidence {item.confidence:.1%}"
        self.info.value = f"Item <b>{item.id}</b> ({html.escape(item.reason.replace('_', ' '))}) &middot; {said}"

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        self.message.value = f'<span style="color:{color}">{html.escape(text)}</span>'
        if error:
            log.warning("review panel: %s", text)
