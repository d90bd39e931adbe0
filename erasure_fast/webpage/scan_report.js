/* report.html's script. It reads the scan's numbers from #report-data (computed and embedded by
   erasure_fast/scanning/report_html.py) and draws every view with the DOM and hand-written SVG: it
   sorts, filters and plots, and computes no statistic of its own. Nothing is fetched. */
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const P = D.pairs, N = P.node.length, NAME = D.stat_names;
  const SVGNS = "http://www.w3.org/2000/svg";
  const KINDS = {
    strongest_erasure: "Positions where its output is erased most (most negative sum of downstream PR)",
    dla_minus_adjusted: "Candidate adversarial examples for DLA (largest |DLA| \u2212 |adjusted DLA|)",
  };
  const state = { stat: D.rank_by, sortKey: "median:" + D.rank_by, sortDir: 1, writer: "", node: "", above: false, limit: 100 };
  const distRow = new Map(D.dist_pairs.map((k, i) => [k, i]));
  const pairAt = new Map();
  for (let k = 0; k < N; k++) pairAt.set(nodeOf(k) + "/" + writerOf(k), k);
  const nodeRank = new Map(D.node_order.map((n, i) => [n, i]));
  // each statistic's ranking as the scan made it (pairs without tokens are not in it)
  const ranked = Object.fromEntries(D.stats.map((st) => [st, new Map(D.ranking[st].order.map((k, i) => [k, i]))]));

  function nodeOf(k) { return D.nodes[P.node[k]]; }
  function writerOf(k) { return D.writers[P.writer[k]]; }
  function captureText(m) { return m.capture_reason ? m.capture + " (" + m.capture_reason + ")" : m.capture; }
  function pairHash(k) { return "#pair/" + encodeURIComponent(nodeOf(k)) + "/" + encodeURIComponent(writerOf(k)); }

  // ---- DOM and SVG builders (text always through text nodes: token texts come from the corpus)
  function build(e, attrs, kids) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of kids.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
  const s = (tag, attrs, ...kids) => build(document.createElementNS(SVGNS, tag), attrs, kids);

  // ---- numbers ("inf" / "-inf": beyond the histogram's range; null: no value)
  function num(x) { return x === "inf" ? Infinity : x === "-inf" ? -Infinity : x; }
  function fmt(x) {
    if (x === null || x === undefined) return "n/a";
    if (x === "inf") return "+inf";
    if (x === "-inf") return "\u2212inf";
    const a = Math.abs(x);
    const t = a === 0 ? "0" : a >= 1000 ? x.toFixed(0) : a >= 10 ? x.toFixed(2) : a >= 0.01 ? x.toFixed(3)
      : a >= 0.0001 ? x.toFixed(4) : x.toExponential(1);
    return t.replace("-", "\u2212");
  }
  // a statistic to the resolution of its histogram (D.decimals: from its bin width)
  function fmtStat(st, x) {
    if (x === null || x === undefined || typeof x === "string") return fmt(x);
    const t = x.toFixed(D.decimals[st]);
    return (/^-0\.?0*$/.test(t) ? t.slice(1) : t).replace("-", "\u2212");
  }
  const count = (x) => (x === null || x === undefined ? "n/a" : Math.round(x).toLocaleString("en-US"));

  // ---- sorting and filtering of the pairs
  function sortValue(key, k) {
    const [what, stat] = key.split(":");
    if (what === "median") return ranked[stat].get(k);  // the scan's order; the page's medians are rounded
    if (what === "null") return num(P[stat].null_median[k]);
    if (what === "node") return nodeRank.get(P.node[k]);
    if (what === "writer") return P.writer[k];
    if (what === "above") return P[state.stat].above[k] ? 0 : 1;
    return num(P[what][k]);  // pr_bos, pr_rest, count
  }
  function orderBy(key, dir) {
    const idx = Array.from({ length: N }, (_, k) => k);
    const missing = (v) => v === null || v === undefined || Number.isNaN(v);
    return idx.sort((a, b) => {
      const va = sortValue(key, a), vb = sortValue(key, b);
      if (missing(va) !== missing(vb)) return missing(va) ? 1 : -1;  // no value: last either way
      if (!missing(va) && va !== vb) return (va < vb ? -1 : 1) * dir;
      const na = nodeOf(a), nb = nodeOf(b);  // ties as the scan's own ranking: node, then writer label
      if (na !== nb) return na < nb ? -1 : 1;
      const wa = writerOf(a), wb = writerOf(b);
      return wa === wb ? 0 : wa < wb ? -1 : 1;
    });
  }
  function rankOf(stat, k) {
    const r = ranked[stat].get(k);
    return r === undefined ? "n/a" : r + 1;
  }
  function shownPairs() {
    return orderBy(state.sortKey, state.sortDir).filter((k) =>
      (!state.writer || writerOf(k) === state.writer) && (!state.node || nodeOf(k) === state.node) &&
      (!state.above || P[state.stat].above[k]));
  }

  // ---- colours: diverging, erasure (negative) red, positive blue, white at 0
  function colour(v, vmax) {
    if (v === null || v === undefined) return "#ffffff";
    const t = Math.max(-1, Math.min(1, num(v) / vmax));
    const end = t < 0 ? [178, 24, 43] : [33, 102, 172];
    const a = Math.abs(t);
    return "rgb(" + end.map((c) => Math.round(255 + (c - 255) * a)).join(",") + ")";
  }

  // ---- page frame
  const app = document.getElementById("app");
  const m = D.meta;
  const tabs = [["pairs", "Ranked pairs"], ["heatmap", "Heatmap"], ["pair", "Pair"], ["resid", "Residual PR"],
    ["examples", "Top examples"], ["run", "Run"]];
  const statSelect = h("select", { id: "stat", "aria-label": "statistic", onchange: (e) => {
    state.stat = e.target.value; state.sortKey = "median:" + state.stat; state.sortDir = 1; route();
  } }, D.stats.map((st) => h("option", { value: st, selected: st === state.stat }, NAME[st] + (st === D.rank_by ? " (the scan's ranking)" : ""))));
  const main = h("main", { id: "view" });
  app.replaceChildren(
    h("header", {},
      h("h1", {}, "Erasure scan report"),
      h("p", { class: "sub" }, `${m.model} \u00b7 ${count(m.tokens)} tokens in ${count(m.rows)} rows of ${m.seq_len} \u00b7 ` +
        `corpus ${m.corpus.source} \u00b7 backend ${m.backend}, capture ${captureText(m)}`),
      m.notes ? h("blockquote", {}, m.notes) : null),
    h("nav", {}, tabs.map(([v, t]) => h("a", { class: "tab", href: "#" + v, "data-view": v }, t)),
      h("label", { class: "stat" }, "Statistic ", statSelect)),
    main,
    h("footer", {}, `erasure_fast ${D.version} \u00b7 the pairs' statistics are also in summary.csv / summary.json beside this ` +
      "file, the distributions by position come from the scan's histograms (checkpoint/), report.md has the ranking and the " +
      "examples as text; statistics are shown to the resolution of their histogram's bins"));

  function route() {
    const parts = location.hash.replace(/^#/, "").split("/").map(decodeURIComponent);
    const view = tabs.some(([v]) => v === parts[0]) ? parts[0] : "pairs";
    document.querySelectorAll("nav a.tab").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
    statSelect.value = state.stat;
    const draw = { pairs: pairsView, heatmap: heatmapView, pair: pairView, resid: residView, examples: examplesView, run: runView }[view];
    main.replaceChildren(...draw(parts.slice(1)));
    main.dataset.view = view;
  }
  window.addEventListener("hashchange", route);

  function select(id, label, options, value, onchange) {
    return h("label", {}, label + " ", h("select", { id, onchange: (e) => onchange(e.target.value) },
      options.map(([v, t]) => h("option", { value: v, selected: v === value }, t))));
  }
  function statTitle(st) { return `${NAME[st]}: ${D.ranking[st].formula}`; }

  // ---- view: ranked pairs
  function pairsView() {
    const st = state.stat;
    const rows = shownPairs();
    const head1 = [h("th", { rowspan: 2 }, "#"), h("th", { rowspan: 2, "data-key": "node" }, "node"),
      h("th", { rowspan: 2, "data-key": "writer" }, "writer")];
    const head2 = [];
    for (const x of D.stats) {
      head1.push(h("th", { colspan: 2, class: "group", title: statTitle(x) }, NAME[x]));
      head2.push(h("th", { "data-key": "median:" + x, class: "first", title: `median ${NAME[x]} over tokens` }, "median"),
        h("th", { "data-key": "null:" + x, title: `median ${NAME[x]} against a random direction of the writer's norm` }, "null"));
    }
    head1.push(h("th", { colspan: 2, class: "group" }, "PR by position"), h("th", { rowspan: 2, "data-key": "count", class: "first" }, "tokens"),
      h("th", { rowspan: 2, "data-key": "above", title: `median ${NAME[st]} below the null threshold` }, `above null (${NAME[st]})`));
    head2.push(h("th", { "data-key": "pr_bos", class: "first" }, "BOS"), h("th", { "data-key": "pr_rest" }, "elsewhere"));
    for (const th of [...head1, ...head2]) {
      const key = th.dataset.key;
      if (!key) continue;
      if (key === state.sortKey) { th.classList.add("sorted"); th.append(state.sortDir > 0 ? " \u25b2" : " \u25bc"); }
      th.addEventListener("click", () => {
        state.sortDir = key === state.sortKey ? -state.sortDir : 1;
        state.sortKey = key;
        route();
      });
    }
    const body = rows.slice(0, state.limit).map((k, i) => {
      const cells = [h("td", {}, i + 1), h("td", {}, nodeOf(k)), h("td", {}, writerOf(k))];
      for (const x of D.stats) {
        cells.push(h("td", { class: "first" + (x === st ? " chosen" : "") }, fmtStat(x, P[x].median[k])),
          h("td", { class: "null" }, fmtStat(x, P[x].null_median[k])));
      }
      cells.push(h("td", { class: "first" }, fmtStat("pr", P.pr_bos[k])), h("td", {}, fmtStat("pr", P.pr_rest[k])), h("td", { class: "first" }, count(P.count[k])),
        h("td", { class: P[st].above[k] ? "yes" : "" }, P[st].above[k] ? "yes" : "no"));
      return h("tr", { "data-node": nodeOf(k), "data-writer": writerOf(k), class: P[st].above[k] ? "above" : null,
        onclick: () => { location.hash = pairHash(k); } }, cells);
    });
    const writers = [["", "all"], ...D.writers.map((w) => [w, w])];
    const nodes = [["", "all"], ...D.node_order.map((n) => [D.nodes[n], D.nodes[n]])];
    return [
      h("h2", {}, "Downstream (node, writer) pairs"),
      h("p", { class: "explain" }, "Each pair: a node (a later head or MLP) and a writer head whose output it reads. Columns: the median over " +
        "tokens of each statistic, and beside it the median of the same statistic against a random direction of the writer's norm " +
        "(the null). Click a column to sort by it (again to reverse), a row to open the pair."),
      h("p", { class: "verdict" }, `${NAME[st]}: ${D.ranking[st].verdict} (null threshold ${fmtStat(st, D.ranking[st].threshold)}).`),
      h("div", { class: "controls" },
        select("filter-writer", "Writer", writers, state.writer, (v) => { state.writer = v; route(); }),
        select("filter-node", "Node", nodes, state.node, (v) => { state.node = v; route(); }),
        h("label", {}, h("input", { type: "checkbox", id: "filter-above", checked: state.above,
          onchange: (e) => { state.above = e.target.checked; route(); } }), ` above the null only (${NAME[st]})`),
        h("span", { class: "count" }, `${Math.min(rows.length, state.limit)} of ${rows.length} shown`)),
      h("table", { class: "pairs", id: "pairs-table" }, h("thead", {}, h("tr", {}, head1), h("tr", {}, head2)), h("tbody", {}, body)),
      rows.length > state.limit ? h("button", { id: "show-all", onclick: () => { state.limit = Infinity; route(); } }, `show all ${rows.length}`) : null,
    ];
  }

  // ---- view: node x writer heatmap
  function heatmapView() {
    const st = state.stat;
    const rows = D.node_order, cols = D.writers.map((_, i) => i);
    const cell = Math.max(7, Math.min(22, Math.floor(880 / Math.max(rows.length, cols.length))));
    const left = 56, top = 58;
    const every = Math.ceil(11 / cell);  // label every n-th row / column when cells are small
    let vmax = 0;
    for (let k = 0; k < N; k++) { const v = num(P[st].median[k]); if (v !== null && Number.isFinite(v)) vmax = Math.max(vmax, Math.abs(v)); }
    vmax = vmax || 1;
    const W = left + cols.length * cell + 10, H = top + rows.length * cell + 10;
    const g = s("svg", { id: "heatmap", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `median ${NAME[st]} of every node onto every writer` });
    cols.forEach((c, j) => {
      if (j % every === 0) {
        const x = left + j * cell + cell / 2;
        g.append(s("text", { x, y: top - 6, transform: `rotate(-60 ${x} ${top - 6})` }, D.writers[c]));
      }
    });
    rows.forEach((n, i) => {
      if (i % every === 0) g.append(s("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end" }, D.nodes[n]));
      cols.forEach((c, j) => {
        const k = pairAt.get(D.nodes[n] + "/" + D.writers[c]);
        const x = left + j * cell, y = top + i * cell;
        if (k === undefined) {
          g.append(s("rect", { x, y, width: cell, height: cell, fill: "#e6e6e6", stroke: "#fff", "stroke-width": 0.5, class: "off" },
            s("title", {}, `${D.nodes[n]} does not read ${D.writers[c]} (not downstream)`)));
          return;
        }
        const above = P[st].above[k];
        g.append(s("rect", { x, y, width: cell, height: cell, fill: colour(P[st].median[k], vmax), class: "cell",
          stroke: above ? "#000" : "#fff", "stroke-width": above ? 2 : 0.5,
          "data-node": D.nodes[n], "data-writer": D.writers[c], onclick: () => { location.hash = pairHash(k); } },
          s("title", {}, `${D.nodes[n]} onto ${D.writers[c]}: median ${NAME[st]} ${fmtStat(st, P[st].median[k])} ` +
            `(null ${fmtStat(st, P[st].null_median[k])})${above ? ", above the null" : ""}`)));
      });
    });
    const legend = h("div", { class: "legend" },
      h("span", {}, h("span", { class: "swatch", style: `background:${colour(-vmax, vmax)}` }), `${fmtStat(st, -vmax)} (erasure)`),
      h("span", {}, h("span", { class: "swatch", style: "background:#fff;border:1px solid #ccc" }), "0"),
      h("span", {}, h("span", { class: "swatch", style: `background:${colour(vmax, vmax)}` }), fmtStat(st, vmax)),
      h("span", {}, h("span", { class: "swatch", style: "background:#e6e6e6" }), "not downstream"),
      h("span", {}, h("span", { class: "swatch", style: "background:#fff;border:2px solid #000" }), "above the null"));
    return [
      h("h2", {}, `Median ${NAME[st]} of every node onto every writer`),
      h("p", { class: "explain" }, `Rows: nodes in layer order (each layer's heads, then its MLP); columns: writers. ${statTitle(st)}. ` +
        "Click a cell to open the pair."),
      legend, h("div", { style: "overflow:auto" }, g),
    ];
  }

  // ---- view: one pair
  function pairView(args) {
    let k = pairAt.get(args.join("/"));
    if (k === undefined) {
      if (args.length) return [h("h2", {}, "No such pair"), h("p", {}, `${args.join(" onto ")} is not a downstream pair of this scan.`)];
      k = orderBy("median:" + state.stat, 1)[0];
    }
    const st = state.stat;
    const order = shownPairs(), at = order.indexOf(k);
    const nav = h("div", { class: "pairnav" }, h("h2", { id: "pair-title" }, `${nodeOf(k)} onto ${writerOf(k)}`),
      at > 0 ? h("a", { href: pairHash(order[at - 1]) }, "\u2190 previous") : null,
      at >= 0 && at + 1 < order.length ? h("a", { href: pairHash(order[at + 1]) }, "next \u2192") : null,
      h("a", { href: "#examples/" + encodeURIComponent(writerOf(k)) }, `${writerOf(k)}'s top examples`),
      h("a", { href: "#resid/" + encodeURIComponent(writerOf(k)) }, `residual PR onto ${writerOf(k)}`));
    const stats = h("table", { class: "stats" },
      h("thead", {}, h("tr", {}, ["statistic", "median", "25 %", "75 %", "mean", "null median", "above null", "rank"].map((t) => h("th", {}, t)))),
      h("tbody", {}, D.stats.map((x) => h("tr", { class: x === st ? "chosen" : null },
        h("td", { title: statTitle(x) }, NAME[x]), h("td", {}, fmtStat(x, P[x].median[k])), h("td", {}, fmtStat(x, P[x]["q0.25"][k])),
        h("td", {}, fmtStat(x, P[x]["q0.75"][k])), h("td", {}, fmt(P[x].mean[k])), h("td", { class: "null" }, fmtStat(x, P[x].null_median[k])),
        h("td", { class: P[x].above[k] ? "yes" : "" }, P[x].above[k] ? "yes" : "no"), h("td", {}, `${rankOf(x, k)} of ${D.ranking[x].order.length}`)))));
    const out = [nav, h("p", { class: "explain" }, `${nodeOf(k)} reads ${writerOf(k)}'s output; ${count(P.count[k])} tokens. ` +
      "Rank: position by the median, most negative first."), stats];
    out.push(h("h3", {}, `${NAME[st]} by position`), ...distribution(k, st));
    const ex = (D.examples[writerOf(k)] || {}).strongest_erasure || [];
    if (ex.length) {
      out.push(h("h3", {}, `Where ${writerOf(k)}'s output is erased most (all its erasers together)`),
        examplesTable(ex.slice(0, 5)), h("p", {}, h("a", { href: "#examples/" + encodeURIComponent(writerOf(k)) }, "all of them \u2192")));
    }
    return out;
  }

  function distribution(k, st) {
    const i = distRow.get(k);
    if (i === undefined) {
      return [h("p", { class: "explain" }, `This page holds the distributions of the ${D.dist_pairs.length} strongest pairs by ` +
        `${NAME[D.rank_by]}; this pair is not among them (its quantiles are in summary.csv).`)];
    }
    const d = D.dist[st], q = d.q[i];
    const names = [...D.buckets, "all but BOS", "all positions"];
    const table = h("table", { class: "quantiles", id: "quantiles" },
      h("thead", {}, h("tr", {}, ["positions", "tokens", "mean", "12.5 %", "25 %", "median", "75 %", "87.5 %"].map((t) => h("th", {}, t)))),
      h("tbody", {}, names.map((n, b) => q[b] ? h("tr", {}, h("td", {}, n), h("td", {}, count(q[b][0])), h("td", {}, fmt(q[b][1])),
        q[b].slice(2).map((v) => h("td", {}, fmtStat(st, v)))) : null)));
    const nullMedian = num(P[st].null_median[k]);
    const out = [h("p", { class: "explain" }, `The distribution of ${NAME[st]} over the tokens of each position bucket: bars are the ` +
      "share of the bucket's tokens in each bin (the scan's histogram, bins merged), the box spans 25\u201375 % with the median, " +
      "the whiskers 12.5\u201387.5 %; dashed: 0, purple dashed: the null median (all positions).")];
    if (d.lo[i] === null) return out.concat([h("p", {}, "No finite values."), table]);
    const lo = d.lo[i], width = d.width[i], nb = d.counts[i][0].length, hi = lo + width * nb;
    const charts = D.buckets.map((name, b) => {
      const counts = d.counts[i][b], total = q[b] ? q[b][0] : 0;
      const Wd = 250, Hd = 150, pad = 22, plotH = 90;
      const x = (v) => pad + ((v - lo) / (hi - lo)) * (Wd - 2 * pad);
      const ymax = Math.max(...counts, 1);
      const g = s("svg", { width: Wd, height: Hd, class: "hist", "data-bucket": b });
      counts.forEach((c, j) => {
        if (!c) return;
        const bh = (c / ymax) * plotH;
        g.append(s("rect", { x: x(lo + j * width), y: 8 + plotH - bh, width: Math.max(1, x(lo + (j + 1) * width) - x(lo + j * width) - 0.5),
          height: bh, fill: "#6d8fc7" }, s("title", {}, `[${fmtStat(st, lo + j * width)}, ${fmtStat(st, lo + (j + 1) * width)}): ` +
          `${count(c)} tokens (${total ? ((100 * c) / total).toFixed(1) : 0} %)`)));
      });
      g.append(s("line", { x1: pad, x2: Wd - pad, y1: 8 + plotH, y2: 8 + plotH, class: "axis" }));
      if (lo < 0 && hi > 0) g.append(s("line", { x1: x(0), x2: x(0), y1: 4, y2: 8 + plotH, class: "zero" }));
      if (nullMedian !== null && nullMedian > lo && nullMedian < hi) g.append(s("line", { x1: x(nullMedian), x2: x(nullMedian), y1: 4, y2: 8 + plotH, class: "nullline" }));
      if (q[b] && q[b][0] > 0) {
        const [, , q1, q2, q3, q4, q5] = q[b].map(num);
        const cx = (v) => x(Math.max(lo, Math.min(hi, v)));
        const yb = 8 + plotH + 12;
        g.append(s("line", { x1: cx(q1), x2: cx(q5), y1: yb, y2: yb, stroke: "#333" }),
          s("rect", { x: cx(q2), y: yb - 5, width: Math.max(1, cx(q4) - cx(q2)), height: 10, fill: "#f2d49b", stroke: "#333" }),
          s("line", { x1: cx(q3), x2: cx(q3), y1: yb - 6, y2: yb + 6, stroke: "#b2182b", "stroke-width": 2 }));
      }
      g.append(s("text", { x: pad, y: Hd - 4 }, fmtStat(st, lo)), s("text", { x: Wd - pad, y: Hd - 4, "text-anchor": "end" }, fmtStat(st, hi)));
      const below = d.below[i][b], above = d.above[i][b];
      return h("div", { class: "dist" }, h("h4", {}, `${name}: ${count(total)} tokens` + (q[b] && q[b][0] ? `, median ${fmtStat(st, q[b][4])}` : "")), g,
        below || above ? h("p", { class: "outside" }, `${count(below)} below, ${count(above)} above the plotted range`) : null);
    });
    const bos = q[0] ? q[0][4] : null, rest = q[D.buckets.length] ? q[D.buckets.length][4] : null;
    out.push(h("div", { class: "dists", id: "dists" }, charts), table,
      h("p", { id: "bos-vs-rest" }, `BOS vs the rest: median ${NAME[st]} ${fmtStat(st, bos)} at position 0, ${fmtStat(st, rest)} at every other position.`));
    return out;
  }

  // about five round values between lo and hi, 0 and 1 among them when they are inside
  function niceTicks(lo, hi) {
    const raw = (hi - lo) / 5, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((f) => f * mag).find((st) => st >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) out.push(Math.round(v / step) * step);
    for (const v of [0, 1]) if (v > lo && v < hi && !out.some((t) => Math.abs(t - v) < step / 2)) out.push(v);
    return out;
  }

  // ---- view: residual stream PR onto a writer (fig 1)
  function residView(args) {
    const featured = D.featured.map((f) => f.writer);
    const w = D.writers.includes(args[0]) ? args[0] : featured[0] || D.writers[0];
    const r = D.resid[w], pts = D.resid_points;
    const idx = pts.map((_, i) => i).filter((i) => r.written[i] && r.median[i] !== null);
    const vals = idx.flatMap((i) => [r["q0.125"][i], r["q0.875"][i], 0, 1].map(num)).filter((v) => Number.isFinite(v));
    let ymin = Math.min(...vals), ymax = Math.max(...vals);
    if (!(ymax > ymin)) { ymin -= 1; ymax += 1; }
    const pad = 0.05 * (ymax - ymin);
    ymin -= pad; ymax += pad;
    const Wd = Math.max(420, 70 * idx.length + 90), Hd = 300, left = 56, right = 20, top = 14, bottom = 76;
    const x = (j) => left + (idx.length > 1 ? (j / (idx.length - 1)) * (Wd - left - right) : (Wd - left - right) / 2);
    const y = (v) => top + (1 - (Math.max(ymin, Math.min(ymax, num(v))) - ymin) / (ymax - ymin)) * (Hd - top - bottom);
    const g = s("svg", { id: "resid-chart", width: Wd, height: Hd });
    for (const v of niceTicks(ymin, ymax)) {
      g.append(s("line", { x1: left, x2: Wd - right, y1: y(v), y2: y(v), class: v === 0 || v === 1 ? "zero" : "grid" }),
        s("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
    }
    const band = (a, b, fill) => {
      const upper = idx.map((i, j) => `${x(j)},${y(r[b][i])}`), lower = idx.map((i, j) => `${x(j)},${y(r[a][i])}`).reverse();
      return s("polygon", { points: upper.concat(lower).join(" "), fill });
    };
    if (idx.length) {
      g.append(band("q0.125", "q0.875", "#dbe5f5"), band("q0.25", "q0.75", "#a9c0e8"),
        s("polyline", { points: idx.map((i, j) => `${x(j)},${y(r.median[i])}`).join(" "), fill: "none", stroke: "#1d4f9c", "stroke-width": 2 }));
    }
    idx.forEach((i, j) => {
      g.append(s("circle", { cx: x(j), cy: y(r.median[i]), r: 3.5, fill: "#1d4f9c" }, s("title", {}, `${pts[i]}: median ${fmtStat("pr", r.median[i])}`)),
        s("text", { x: x(j), y: Hd - bottom + 14, transform: `rotate(-40 ${x(j)} ${Hd - bottom + 14})`, "text-anchor": "end" }, pts[i]));
    });
    const notWritten = pts.filter((_, i) => !r.written[i]);
    const options = [...featured.map((f) => [f, f + " (featured)"]), ...D.writers.filter((v) => !featured.includes(v)).map((v) => [v, v])];
    const erasers = (D.featured.find((f) => f.writer === w) || {}).nodes;
    return [
      h("h2", {}, `Residual stream PR onto ${w}`),
      h("div", { class: "controls" }, select("resid-writer", "Writer", options, w, (v) => { location.hash = "#resid/" + encodeURIComponent(v); })),
      h("p", { class: "explain" }, `Fig. 1 of the paper, for any writer: the projection ratio of the residual stream onto ${w}'s output at ` +
        "each residual point, median (line), 25\u201375 % (dark band) and 12.5\u201387.5 % (light band) over tokens. A PR of 1 means the " +
        "stream holds the writer's output as written; erasure pulls it towards 0. " +
        (notWritten.length ? `Points before ${w} writes (${notWritten.join(", ")}) are left out: its output is not in the stream there. ` : "") +
        `Featured: the ${D.featured_reason}` + (erasers ? `; ${w} is erased by ${erasers.join(", ")}.` : ".")),
      h("div", { style: "overflow:auto" }, g),
      h("table", {}, h("thead", {}, h("tr", {}, ["point", "12.5 %", "25 %", "median", "75 %", "87.5 %"].map((t) => h("th", {}, t)))),
        h("tbody", {}, idx.map((i) => h("tr", {}, h("td", {}, pts[i]), ["q0.125", "q0.25", "median", "q0.75", "q0.875"].map((c) => h("td", {}, fmtStat("pr", r[c][i]))))))),
    ];
  }

  // ---- view: top examples with their token context
  function visible(t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, ""); }
  function contextNode(e) {
    const out = h("span", { class: "context" });
    e.context_ids.forEach((id, i) => {
      const text = D.vocab ? D.vocab[String(id)] : undefined;
      const role = i === e.context_at ? " here" : i === e.context_at + 1 ? " target" : "";
      if (i === e.context_at + 1) out.append(h("span", { class: "arrow" }, "\u2192"));
      out.append(h("span", { class: "tok" + (text === undefined ? " id" : "") + role,
        title: `token id ${id}` + (role === " here" ? ` at position ${e.pos}` : role ? " (the next-token target)" : "") },
      text === undefined ? String(id) : visible(text)));
    });
    return out;
  }
  function examplesTable(list) {
    return h("table", { class: "examples" },
      h("thead", {}, h("tr", {}, ["#", "row", "pos", "sum downstream PR", "DLA", "adjusted DLA", "context"].map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map((e, i) => h("tr", {}, h("td", {}, i + 1), h("td", {}, e.row), h("td", {}, e.pos), h("td", {}, fmt(e.sum_downstream_pr)),
        h("td", {}, fmt(e.dla)), h("td", {}, fmt(e.adjusted_dla)), h("td", { class: "ctx" }, contextNode(e))))));
  }
  function examplesView(args) {
    const featured = D.featured.map((f) => f.writer);
    const w = D.writers.includes(args[0]) ? args[0] : featured[0] || D.writers[0];
    const options = [...featured.map((f) => [f, f + " (featured)"]), ...D.writers.filter((v) => !featured.includes(v)).map((v) => [v, v])];
    const out = [h("h2", {}, `Top examples of ${w}`),
      h("div", { class: "controls" }, select("examples-writer", "Writer", options, w, (v) => { location.hash = "#examples/" + encodeURIComponent(v); })),
      h("p", { class: "explain" }, `Every writer keeps its top ${D.examples_kept} positions of each kind (--top-k)` +
        (D.examples_shown < D.examples_kept ? `; this page shows ${D.examples_shown} (summary.json has all)` : "") +
        ". DLA: the writer's direct logit attribution to the next token; adjusted DLA: the same after the erasure of its output " +
        "by every later node (DLA \u00d7 (1 + sum of downstream PR)). Context: the tokens the model read, the position highlighted, " +
        "\u2192 its next-token target" + (D.vocab ? " (each token decoded on its own)." : " (token ids: the scan had no tokenizer).")) ];
    for (const [kind, title] of Object.entries(KINDS)) {
      const list = D.examples[w][kind];
      out.push(h("h3", {}, title), list.length ? examplesTable(list) : h("p", {}, "None."));
    }
    return out;
  }

  // ---- view: the run
  function runView() {
    const rows = [["model", `${m.model} (fingerprint ${m.model_fingerprint})`], ["corpus", m.corpus.source],
      ["corpus kind", m.corpus.kind], ["token hash", m.corpus.content_hash], ["tokens", `${count(m.tokens)} in ${count(m.rows)} rows of ${m.seq_len}`],
      ["BOS prepended", m.prepend_bos === null ? "no" : `token ${m.prepend_bos}`], ["writers", D.writers.join(", ")],
      ["backend", m.backend], ["capture", captureText(m)], ["processes", m.world_size], ["batch size", m.batch_size],
      ["time", `${fmt(m.elapsed_s)} s` + (m.tokens_per_s ? ` (${count(m.tokens_per_s)} tokens/s)` : "")],
      ["ranking", `${NAME[D.rank_by]}: ${D.ranking[D.rank_by].formula}`],
      ["position buckets", D.buckets.join(", ")],
      ["PR histogram", `${m.pr_hist.bins} bins over [${m.pr_hist.lo}, ${m.pr_hist.hi}), centred on multiples of their width ` +
        `${((m.pr_hist.hi - m.pr_hist.lo) / m.pr_hist.bins).toPrecision(3)}`],
      ["configuration digest", m.config_digest], ["machine", m.machine],
      ...Object.entries(m.versions).map(([k, v]) => ["version of " + k, v])];
    if (m.corpus.dropped_tokens) rows.push(["tokens in no row", count(m.corpus.dropped_tokens)]);
    for (const [k, v] of Object.entries(m.plot_errors || {})) rows.push([`plot ${k}`, `not drawn (${v})`]);
    return [h("h2", {}, "Run"), h("dl", { class: "meta", id: "run-meta" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]))];
  }

  route();
})();
