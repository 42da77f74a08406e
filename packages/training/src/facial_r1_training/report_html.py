"""Static review pages: the synthesized test split for manual inspection (HTML + CSV).

The HTML page is self-contained (thumbnails embedded as base64 PNG, no external assets). Each
row shows the image, the ground truth, what the reasoning names, the filter's verdict and two
reviewer fields (decision, notes); a button saves the reviewer's decisions as CSV.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_review_html(d / "r.html", [], title="t")
0
>>> "No samples" in (d / "r.html").read_text()
True
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Sequence
from typing import Any

from facial_r1_core.schema import atomic_write

CSV_FIELDS = (
    "id",
    "dataset",
    "image",
    "AUs",
    "labels",
    "predicted_aus",
    "predicted_emotion",
    "reasoning",
    "answer",
    "auto_verdict",
    "auto_reasons",
    "attempts",
    "review_decision",
    "review_notes",
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}
th{background:#f2f2f2;position:sticky;top:0}
td.reason{max-width:40em}
tr.rejected td{background:#fff4f4}
.muted{color:#888}
img{image-rendering:pixelated}
"""

_SCRIPT = """
function saveDecisions(){
  const rows=[["id","review_decision","review_notes"]];
  document.querySelectorAll("tr[data-id]").forEach(tr=>{
    rows.push([tr.dataset.id, tr.querySelector("select").value,
               tr.querySelector("input").value]);
  });
  const text=rows.map(r=>r.map(v=>'"'+String(v).replace(/"/g,'""')+'"').join(",")).join("\\n");
  const a=document.createElement("a");
  a.href=URL.createObjectURL(new Blob([text],{type:"text/csv"}));
  a.download="review_decisions.csv"; a.click();
}
"""


def thumbnail_data_uri(path: str | os.PathLike, size: int = 96) -> str | None:
    """A PNG data URI of the image scaled to fit ``size`` px, or None if it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            if max(img.size) > size:
                img.thumbnail((size, size))
            elif max(img.size) < size:  # upscale small images so faces are visible
                scale = size / max(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
    except Exception:
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_review_html(
    path: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    *,
    title: str = "Review",
    thumbnail_px: int = 96,
) -> int:
    """Write the review page atomically; returns the number of rows."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    if not rows:
        parts.append("<p class='muted'>No samples in this split.</p>")
    else:
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["auto_verdict"]] = counts.get(row["auto_verdict"], 0) + 1
        summary = ", ".join(f"{esc(k)}: {v}" for k, v in sorted(counts.items()))
        parts.append(
            f"<p>{len(rows)} rows ({summary}). Set a decision per row, then "
            "<button onclick='saveDecisions()'>save decisions as CSV</button></p>"
        )
        parts.append(
            "<table><tr><th>#</th><th>image</th><th>ground truth</th><th>reasoning names</th>"
            "<th>reasoning</th><th>answer</th><th>filter</th><th>review</th></tr>"
        )
        for i, row in enumerate(rows, start=1):
            uri = thumbnail_data_uri(row.get("image_path", ""), thumbnail_px)
            img = (
                f"<img src='{uri}' width='{thumbnail_px}' alt='{esc(row['image'])}'>"
                if uri
                else "<span class='muted'>image unreadable</span>"
            )
            cls = "" if row["auto_verdict"] == "accepted" else " class='rejected'"
            parts.append(
                f"<tr data-id='{esc(row['id'])}'{cls}><td>{i}</td>"
                f"<td>{img}<br><small>{esc(row['dataset'])}/{esc(row['image'])}</small></td>"
                f"<td>AUs: {esc(row['AUs'])}<br>emotion: <b>{esc(row['labels'])}</b></td>"
                f"<td>AUs: {esc(row['predicted_aus'])}<br>emotion: "
                f"{esc(row['predicted_emotion'])}</td>"
                f"<td class='reason'>{esc(row['reasoning'])}</td>"
                f"<td>{esc(row['answer'])}</td>"
                f"<td><b>{esc(row['auto_verdict'])}</b>"
                f"{'<br>attempts: ' + esc(str(row['attempts'])) if row.get('attempts') else ''}"
                f"<br><small>{esc(row['auto_reasons'])}</small></td>"
                "<td><select><option value=''>-</option><option>accept</option>"
                "<option>reject</option></select><br>"
                "<input placeholder='notes' size='16'></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    with atomic_write(path) as handle:
        handle.write("\n".join(parts))
    return len(rows)


def write_review_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> int:
    """Write the review rows as CSV (reviewer columns empty) atomically."""
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return len(rows)
