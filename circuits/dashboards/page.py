"""One feature's dashboard as a static, self-contained HTML page (no script, no network).

Every string that comes from the corpus, the tokenizer or an explainer goes through
`circuits.dashboards.text.esc`; numbers are formatted by us. The page carries a Content Security
Policy that allows no script and no request at all (`default-src 'none'`), so even a string that
escaped escaping could not run or fetch anything. Token highlighting: each active token is a
<span> whose background opacity is c_t / max_act (the feature's maximum over the cache) and whose
title attribute (hover) gives the token and c_t.
"""
from __future__ import annotations

import math
from typing import Sequence

from .data import ContextGroup, FeatureView
from .text import esc, esc_token

PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
            "form-action 'none'")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;padding:12px 18px;color:#222;background:#fff}
h1{font-size:20px;margin:4px 0 2px}h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:13px;margin:10px 0 4px;color:#555}
.stats{color:#444}.stats b{color:#000}.grid{display:flex;flex-wrap:wrap;gap:18px}
.grid>div{flex:1 1 300px;min-width:280px}
table{border-collapse:collapse;font-size:13px}td,th{padding:1px 8px;text-align:left}th{color:#555;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;background:#f3f3f3;padding:0 2px;border-radius:2px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;overflow-wrap:anywhere;border-bottom:1px solid #eee;padding:2px 0;display:flex}
.ctx .m{flex:0 0 5.5em;color:#888;text-align:right;padding-right:8px}
.ctx .s{flex:1}
.ctx span[title]{background:rgba(255,110,0,var(--a));border-radius:2px;cursor:help}
.expl{background:#f6f8ff;border-left:3px solid #6a7fdb;padding:6px 10px;white-space:pre-wrap}
svg{display:block}svg text{font:10px sans-serif;fill:#555}
a{color:#2750b8}.muted{color:#888}
"""


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.4g}"


def _geometric(edges: Sequence[float]) -> bool:
    """Whether the inner bin edges grow by a constant ratio (log-spaced bins)."""
    inner = list(edges[1:-1])
    if len(inner) < 3 or min(inner) <= 0:
        return False
    r = [b / a for a, b in zip(inner, inner[1:])]
    return max(r) - min(r) < 1e-6 * max(r) and r[0] > 1 + 1e-9


def histogram_svg(edges: Sequence[float], counts: Sequence[int], *, width: int = 420, height: int = 120,
                  colour_by_sign: bool = False, label: str = "") -> str:
    """A bar chart of a histogram as inline SVG; each bar's <title> gives its range and count."""
    if not counts or len(edges) != len(counts) + 1:
        return '<p class="muted">no data</p>'
    pad_l, pad_b, pad_t = 4, 16, 4
    w, h = width - 2 * pad_l, height - pad_b - pad_t
    top = max(counts) or 1
    bw = w / len(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / top
        mid = (edges[i] + edges[i + 1]) / 2
        fill = ("#d62728" if mid >= 0 else "#1f77b4") if colour_by_sign else "#ff7f0e"
        bars.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 0.6, 0.5):.1f}" '
                    f'height="{bh:.1f}" fill="{fill}"><title>[{_num(edges[i])}, {_num(edges[i + 1])}): {c}</title></rect>')
    axis = (f'<text x="{pad_l}" y="{height - 3}">{_num(edges[0])}</text>'
            f'<text x="{width - pad_l}" y="{height - 3}" text-anchor="end">{_num(edges[-1])}</text>'
            f'<text x="{width / 2:.0f}" y="{height - 3}" text-anchor="middle">{esc(label)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{esc(label)}">{"".join(bars)}{axis}</svg>')


def _context_row(tokens: Sequence[str], acts: Sequence[float], scale: float) -> str:
    inv = 0.92 / scale if scale > 0 else 0.0
    parts = []
    for t, a in zip(tokens, acts):
        text, title = esc_token(t)
        if a > 0:
            alpha = min(1.0, 0.08 + a * inv) if inv else 1.0
            parts.append(f'<span style="--a:{alpha:.2f}" title="{title}: {a:.4g}">{text}</span>')
        else:
            parts.append(text)
    return "".join(parts)


def _group(g: ContextGroup, scale: float) -> str:
    rows = "".join(f'<div class="ctx"><span class="m">{c.max_act:.3g}</span><span class="s">'
                   f'{_context_row(c.tokens, c.acts, scale)}</span></div>' for c in g.contexts)
    return f'<div class="group" data-kind="{g.kind}"><h3>{esc(g.title)}</h3>{rows}</div>'


def _token_table(rows: Sequence[tuple[str, float]], head: str) -> str:
    body = "".join(f'<tr><td><span class="tok">{esc_token(t)[0]}</span></td><td class="n">{v:+.3f}</td></tr>'
                   for t, v in rows)
    return f'<table><tr><th>{head}</th><th>logit</th></tr>{body}</table>'


def feature_page(view: FeatureView, *, index_href: str = "../index.html",
                 feature_href=None, title: str | None = None) -> str:
    """The HTML text of one dashboard. feature_href(j) -> relative URL of feature j's page at the
    same site, or None (then correlated features are not linked)."""
    v = view
    name = f"{v.site} / feature {v.feature}"
    dens = (f"{100 * v.density:.4g}% (log10 {math.log10(v.density):.2f})" if v.density > 0 else "0 (never fired)")
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f'<title>{esc(title or name)}</title><style>{CSS}</style></head><body>',
           f'<p><a href="{esc(index_href)}">← all features</a></p><h1>{esc(name)}</h1>',
           f'<p class="stats">density <b>{dens}</b> · max activation <b>{_num(v.max_act)}</b> · '
           f'mean when active <b>{_num(v.mean_active)}</b> · over <b>{v.n_tokens:,}</b> tokens</p>']
    if v.explanation is not None or v.scores:
        out.append('<h2>Explanation</h2>')
        if v.explanation is not None:
            out.append(f'<div class="expl" id="explanation">{esc(v.explanation)}</div>')
        if v.scores:
            out.append('<table id="scores"><tr><th>scorer</th><th>score</th></tr>' + "".join(
                f'<tr><td>{esc(k)}</td><td class="n">{_num(s)}</td></tr>' for k, s in sorted(v.scores.items()))
                + '</table>')
    log = _geometric(v.hist_edges)
    out.append('<div class="grid"><div><h2>Activation histogram</h2>'
               + histogram_svg(v.hist_edges, v.hist_counts,
                               label="activation of nonzero tokens" + (" (log-spaced bins)" if log else ""))
               + '</div>')
    if v.logits_hist_counts:
        out.append('<div><h2>Logit effects W<sub>U</sub>·(γ⊙d)</h2>'
                   + histogram_svg(v.logits_hist_edges, v.logits_hist_counts, colour_by_sign=True,
                                   label="direct logit effect over the vocabulary") + '</div>')
    out.append('</div>')
    if v.logits_top:
        out.append('<div class="grid" id="logits"><div>' + _token_table(v.logits_bottom, "negative")
                   + '</div><div>' + _token_table(v.logits_top, "positive") + '</div></div>')
    tables = []
    if v.alignment:
        tables.append('<div><h2>Neuron alignment</h2><table id="alignment"><tr><th>neuron</th><th>W<sub>dec</sub></th>'
                      '<th>% of L1</th></tr>' + "".join(
                          f'<tr><td>{j}</td><td class="n">{w:+.3f}</td><td class="n">{100 * f:.1f}%</td></tr>'
                          for j, w, f in v.alignment) + '</table></div>')
    if v.correlated:
        rows = []
        for j, r, c in v.correlated:
            href = feature_href(j) if feature_href else None
            cell = f'<a href="{esc(href)}">{j}</a>' if href else str(j)
            rows.append(f'<tr><td>{cell}</td><td class="n">{r:+.3f}</td><td class="n">'
                        f'{"–" if c is None else f"{c:+.3f}"}</td></tr>')
        tables.append('<div><h2>Correlated features</h2><table id="correlated"><tr><th>feature</th>'
                      '<th>Pearson r</th><th>decoder cos</th></tr>' + "".join(rows) + '</table></div>')
    if tables:
        out.append('<div class="grid">' + "".join(tables) + '</div>')
    scale = v.max_act if v.max_act > 0 else max((c.max_act for g in v.groups for c in g.contexts), default=0.0)
    out.append(f'<h2>Contexts</h2><section id="contexts" data-rows="{v.n_contexts}">'
               + "".join(_group(g, scale) for g in v.groups if g.contexts) + '</section>')
    out.append('</body></html>\n')
    return "".join(out)
