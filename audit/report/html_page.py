"""The report as one self-contained HTML page: the plot inline as SVG, styles inline, no
script and nothing fetched, so it can be archived and opened offline. Every text from the
log is escaped. The NOT VERIFIED stamp is printed at the top and at the bottom.
"""

from __future__ import annotations

import html

from iortd.audit.record import DeliveryRecord
from iortd.audit.report.content import build_doc
from iortd.audit.report.model import Heading, KeyValues, Para, Plot, SignOff, Table, looks_hex
from iortd.audit.report.plot import plot_svg
from iortd.auditlog.keyring import Keyring
from iortd.kernel.version import __version__

__all__ = ["html_report"]

_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;font-size:10pt;color:#111;
max-width:190mm;margin:12mm auto;padding-bottom:30mm}
h1{font-size:17pt;margin:0}h2{font-size:12pt;color:#1f4e79;margin:14pt 0 4pt}
.sub{font-size:11pt}.status{font-weight:bold;font-size:11pt;margin:6pt 0}
table{border-collapse:collapse;width:100%;margin:4pt 0 8pt}
td,th{text-align:left;vertical-align:top;padding:2pt 4pt;border-bottom:1px solid #ccc;
font-size:8.5pt}
th{background:#e8eef5;border-bottom:1.5px solid #1f4e79}
td.k{width:30%}.mono,pre{font-family:"DejaVu Sans Mono",monospace;font-size:8pt;
word-break:break-all}
.note{color:#444;font-size:8.5pt}.warn{color:#9c2a00;font-weight:bold}
.outcome{font-size:18pt;font-weight:bold;margin:4pt 0}
.stamp{color:#fff;background:#c00000;padding:4pt 8pt;font-weight:bold}
.footer{font-family:"DejaVu Sans Mono",monospace;font-size:7.5pt;border-top:1px solid #1f4e79;
margin-top:16pt;padding-top:4pt;color:#333}
.signoff td{height:12mm;border:1px solid #7f7f7f}
figure{margin:0}svg{width:100%;height:auto}
@media print{.footer{position:fixed;bottom:0;left:0;right:0;background:#fff}}
"""


def html_report(
    rec: DeliveryRecord,
    *,
    pubkey_name: str | None = None,
    keyring: Keyring | None = None,
) -> bytes:
    doc = build_doc(rec, pubkey_name=pubkey_name, keyring=keyring)
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(doc.title)} {e(rec.delivery_id)}</title>",
        f'<meta name="generator" content="iort-audit {__version__}">',
        f'<meta name="created" content="{e(doc.created or "")}">',
        f"<style>{_CSS}</style></head><body>",
    ]
    stamp = f"{doc.stamp_head} {doc.stamp}" if doc.stamp else None
    if stamp:
        out.append(f'<p class="stamp">{e(stamp)}</p>')
    out += [
        f"<h1>{e(doc.title)}</h1>",
        f'<p class="sub">{e(doc.subtitle)}</p>',
        f'<p class="status">{e(doc.status_line)}</p>',
    ]
    for blk in doc.blocks:
        if isinstance(blk, Heading):
            out.append(f"<h2>{e(blk.text)}</h2>")
        elif isinstance(blk, Para):
            if blk.style == "mono":
                out.append(f"<pre>{e(blk.text)}</pre>")
            else:
                out.append(f'<p class="{blk.style}">{e(blk.text)}</p>')
        elif isinstance(blk, KeyValues):
            out.append("<table>")
            for k, v in blk.rows:
                cls = ' class="mono"' if looks_hex(v) else ""
                out.append(f'<tr><td class="k">{e(k)}</td><td{cls}>{e(v)}</td></tr>')
            out.append("</table>")
        elif isinstance(blk, Table):
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in blk.header) + "</tr>")
            for row in blk.rows:
                out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif isinstance(blk, Plot):
            out.append(f"<h2>{e(blk.caption)}</h2><figure>{plot_svg(rec, blk.kind)}</figure>")
        elif isinstance(blk, SignOff):
            out.append(
                '<h2>Review and sign-off</h2><table class="signoff">'
                "<tr><td>Reviewed by (medical physicist)</td><td></td><td>Date</td><td></td></tr>"
                "<tr><td>Signature</td><td></td><td>Comments</td><td></td></tr></table>"
            )
    out.append('<div class="footer">' + "<br>".join(e(x) for x in doc.footer) + "</div>")
    if stamp:
        out.append(f'<p class="stamp">{e(stamp)}</p>')
    out.append("</body></html>\n")
    return "\n".join(out).encode("utf-8")
