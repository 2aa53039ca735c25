"""The index page: every rendered feature in one table with search, sorting and paging.

The data is one compact JSON document inside <script type="application/json"> (strings made
visible and <, >, & written as \\u escapes, so nothing in it can close the block), read by a
small inline script that builds only the visible page of rows (100 by default) with
`textContent` (never innerHTML), so opening the index costs one JSON parse however many
features there are. The Content Security Policy allows that one script (by its SHA-256 hash)
and nothing else: no other script, no request.

JSON layout:  {"sites": [[site, url prefix], ...], "scorers": [name, ...],
               "rows": [[site index, feature, density, max_act, top token, explanation, score...], ...]}
"""
from __future__ import annotations

import base64
import hashlib

from .page import CSS
from .text import esc, script_json

JS = r"""
(function(){
"use strict";
var D=JSON.parse(document.getElementById("data").textContent);
var S=D.sites,SC=D.scorers,R=D.rows,PAGE=100,page=0,key=3,dir=-1,q="",view=R.slice();
var cols=[["feature",1],["density",2],["max act",3],["top token",4],["explanation",5]];
SC.forEach(function(s,i){cols.push([s,6+i]);});
var head=document.getElementById("head"),body=document.getElementById("rows"),info=document.getElementById("info");
function cmp(a,b){var x=a[key],y=b[key];if(key===1){x=S[a[0]][0]+"/"+String(1e9+a[1]);y=S[b[0]][0]+"/"+String(1e9+b[1]);}
 if(x===null||x===undefined)return 1;if(y===null||y===undefined)return -1;return (x<y?-1:x>y?1:0)*dir;}
function text(r){return (S[r[0]][0]+"/"+r[1]+" "+r[4]+" "+r[5]).toLowerCase();}
function update(){var t=q.toLowerCase();view=t?R.filter(function(r){return text(r).indexOf(t)>=0;}):R.slice();
 view.sort(cmp);page=Math.min(page,Math.max(0,Math.ceil(view.length/PAGE)-1));draw();}
function num(x){return x===null||x===undefined?"–":(Math.abs(x)>=0.01||x===0?x.toPrecision(3):x.toExponential(2));}
function td(tr,s,cls){var c=document.createElement("td");c.textContent=s;if(cls)c.className=cls;tr.appendChild(c);return c;}
function draw(){body.textContent="";var a=page*PAGE,rows=view.slice(a,a+PAGE);
 rows.forEach(function(r){var tr=document.createElement("tr"),c=document.createElement("td"),l=document.createElement("a");
  l.href=S[r[0]][1]+"f"+r[1]+".html";l.textContent=S[r[0]][0]+" / "+r[1];c.appendChild(l);tr.appendChild(c);
  td(tr,num(r[2]),"n");td(tr,num(r[3]),"n");td(tr,r[4],"tok-cell");td(tr,r[5]);
  for(var i=0;i<SC.length;i++)td(tr,num(r[6+i]),"n");body.appendChild(tr);});
 info.textContent=view.length?("features "+(a+1)+"–"+(a+rows.length)+" of "+view.length+(view.length<R.length?" (filtered from "+R.length+")":"")):"no feature matches";
 Array.prototype.forEach.call(head.children,function(th,i){th.setAttribute("aria-sort",cols[i][1]===key?(dir>0?"ascending":"descending"):"none");});}
cols.forEach(function(c){var th=document.createElement("th");th.textContent=c[0];th.tabIndex=0;
 th.addEventListener("click",function(){if(key===c[1])dir=-dir;else{key=c[1];dir=(c[1]===1||c[1]>=4&&c[1]<6)?1:-1;}update();});
 head.appendChild(th);});
document.getElementById("q").addEventListener("input",function(e){q=e.target.value;page=0;update();});
document.getElementById("prev").addEventListener("click",function(){if(page>0){page--;draw();}});
document.getElementById("next").addEventListener("click",function(){if((page+1)*PAGE<view.length){page++;draw();}});
update();document.body.setAttribute("data-ready-ms",performance.now().toFixed(1));document.body.setAttribute("data-ready","1");
})();
"""

_INDEX_CSS = """
#bar{display:flex;gap:10px;align-items:center;margin:8px 0}#q{flex:1;padding:4px 8px;font-size:14px}
#head th{cursor:pointer;user-select:none;border-bottom:1px solid #ccc}#head th[aria-sort=ascending]::after{content:" ▲"}
#head th[aria-sort=descending]::after{content:" ▼"}#tbl td{border-bottom:1px solid #f0f0f0;vertical-align:top}
#tbl td:nth-child(5){max-width:520px}.tok-cell{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre}
"""


def _hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()


def index_page(data: dict, *, title: str = "Feature dashboards") -> str:
    """The HTML text of the index page for `data` laid out as in the module docstring."""
    csp = (f"default-src 'none'; script-src '{_hash(JS)}'; style-src 'unsafe-inline'; img-src data:; "
           f"base-uri 'none'; form-action 'none'")
    n = len(data["rows"])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}{_INDEX_CSS}</style></head><body>'
            f'<h1>{esc(title)}</h1><p class="stats">{n:,} features · click a column to sort · '
            f'search matches id, top token and explanation</p>'
            f'<div id="bar"><input id="q" type="search" placeholder="search features" aria-label="search">'
            f'<button id="prev" type="button">‹ prev</button><button id="next" type="button">next ›</button>'
            f'<span id="info"></span></div>'
            f'<table id="tbl"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>'
            f'<noscript><p>The table needs JavaScript; each feature page is at SITE/fN.html.</p></noscript>'
            f'<script type="application/json" id="data">{script_json(data)}</script>'
            f'<script>{JS}</script></body></html>\n')
