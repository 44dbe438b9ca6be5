"""The delivery report for auditors and physicists: PDF (reportlab) and HTML.

Both are rendered from one document model built from a DeliveryRecord (what the verified
log holds, nothing else), so the two say the same. The plot is drawn by matplotlib
(Agg, no display): embedded in the PDF as a PNG at print resolution, in the HTML as SVG.

Deterministic: no clock (the PDF's creation date is the delivery's last entry's time),
reportlab's invariant mode (fixed document id), fonts embedded from a pinned package
(the DejaVu faces matplotlib ships), a fixed SVG hash salt, no software-version metadata
in the images. The same log and the same pinned libraries give the same bytes
(tests/unit/test_golden_outputs.py holds them to the digests of a committed log).

The parts:

* ``model.py``: the document model (headings, paragraphs, key-value lists, tables, the
  plot's place, the sign-off box) and how figures, times and durations are written;
* ``content.py``: what the report says, computed from the record (``build_doc``);
* ``plot.py``: the dose plot (matplotlib);
* ``pdf.py``: the PDF (reportlab; fonts from matplotlib's data);
* ``html_page.py``: the HTML page, the plot inline as SVG.

``model`` and ``content`` need nothing outside the standard library and iortd; ``plot``,
``pdf`` and ``html_page`` import matplotlib and reportlab at import time, which are the
optional extra ``reports``. ``iort-audit`` imports them only for ``report``, and says which
package is missing and how to install it when they are not there (audit/cli.py). Nothing is
re-exported here, so importing the model never pulls in the heavy libraries.
"""
