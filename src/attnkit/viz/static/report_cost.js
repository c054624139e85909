/* attnkit report: the "cost" section. What attention costs in this model for this input,
 * from attnkit.viz.cost.cost_data: the split of one forward at the input's length, attention's
 * FLOPs, the KV cache a decoder of this shape holds, and attention's share of the forward
 * against length (an inline SVG). Text reaches the page through textContent only.
 * AttnkitCost.section(cost) returns the section's element; AttnkitCost.svg(tag, attrs, text) makes
 * an SVG element (the compare page draws with it too). */
(function () {
  "use strict";

  // The SVG namespace as the HTML parser assigns it to a static <svg>: the page holds no URL at all.
  const SVG = (() => { const t = document.createElement("template"); t.innerHTML = "<svg></svg>"; return t.content.firstChild.namespaceURI; })();
  const PARTS = [["attention_s", "attention", "#e15759"], ["projections_s", "Q/K/V/O projections", "#f28e2b"],
                 ["feed_forward_s", "feed-forward", "#4e79a7"], ["rest_s", "rest", "#bab0ac"]];

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(c);
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text != null) node.textContent = text;
    return node;
  }
  const pct = (x) => `${(100 * x).toFixed(x < 0.1 ? 1 : 0)}%`;
  const ms = (s) => `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
  const int = (n) => n.toLocaleString("en-US");
  const { bytes } = window.AttnkitUnits;  // units.js

  /* One stacked bar of the forward's time at the input's length, with a legend. */
  function splitBar(split) {
    const total = Math.max(PARTS.reduce((a, [k]) => a + Math.max(split[k], 0), 0), 1e-12);
    const bar = el("div", { class: "akc-bar", "data-role": "cost-split" });
    const legend = el("div", { class: "akc-legend" });
    for (const [key, name, colour] of PARTS) {
      const share = Math.max(split[key], 0) / total;
      const seg = el("span", { class: "akc-seg", title: `${name}: ${ms(split[key])} (${pct(share)})`, "data-part": key });
      seg.style.width = `${(100 * share).toFixed(2)}%`;
      seg.style.background = colour;
      bar.appendChild(seg);
      const dot = el("span", { class: "akc-dot" });
      dot.style.background = colour;
      legend.appendChild(el("span", {}, [dot, el("span", { text: `${name} ${ms(split[key])} (${pct(share)})` })]));
    }
    return [bar, legend];
  }

  /* Attention's share of the forward against length, log2 x axis; the input's length marked. */
  function growthChart(cost) {
    const W = 460, H = 200, L = 48, R = 14, T = 14, B = 34;
    const pts = cost.growth;
    const xs = pts.map((p) => Math.log2(p.length));
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
    const top = Math.max(0.05, ...pts.map((p) => p.attention_share)) * 1.15;
    const X = (v) => L + (W - L - R) * (Math.log2(v) - x0) / (x1 - x0);
    const Y = (s) => T + (H - T - B) * (1 - Math.min(Math.max(s, 0), top) / top);
    const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "akc-chart", "data-role": "cost-growth",
      role: "img", "aria-label": "attention's share of the forward against context length" });
    chart.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    chart.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
    for (const f of [0, 0.5, 1]) {
      const s = top / 1.15 * f;
      chart.appendChild(svg("text", { x: L - 6, y: Y(s) + 4, "text-anchor": "end", class: "akc-tick" }, pct(s)));
    }
    pts.forEach((p) => chart.appendChild(svg("text", { x: X(p.length), y: H - B + 16, "text-anchor": "middle", class: "akc-tick" }, String(p.length))));
    chart.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "akc-tick" }, "context length (tokens)"));
    chart.appendChild(svg("polyline", { points: pts.map((p) => `${X(p.length).toFixed(1)},${Y(p.attention_share).toFixed(1)}`).join(" "),
      fill: "none", stroke: "#e15759", "stroke-width": 2 }));
    for (const p of pts) {
      const here = p.length === cost.length;
      const dot = svg("circle", { cx: X(p.length).toFixed(1), cy: Y(p.attention_share).toFixed(1), r: here ? 5 : 3,
        fill: here ? "#111" : "#e15759", "data-length": p.length });
      dot.appendChild(svg("title", {}, `${p.length} tokens: attention ${pct(p.attention_share)} of ${ms(p.total_s)}`));
      chart.appendChild(dot);
    }
    return chart;
  }

  function section(cost) {
    const s = cost.split, kv = cost.kv_cache;
    const box = el("section", { class: "akc", "data-role": "cost" });
    box.appendChild(el("h2", { class: "akc-title", text: "What attention costs here" }));
    box.appendChild(el("p", { text: `One forward of ${cost.model} at this input's ${cost.length} tokens took ${ms(s.total_s)} ` +
      `(median of ${cost.repeats} timed run${cost.repeats === 1 ? "" : "s"}; ${cost.machine}${s.noisy ? "; noisy: the runs spread over 20%" : ""}).` }));
    for (const node of splitBar(s)) box.appendChild(node);
    const fl = cost.attention_flops, ffn = cost.feed_forward_flops;
    box.appendChild(el("p", { "data-role": "cost-flops", "data-value": String(fl),
      text: `Attention FLOPs: ${int(fl)} (4·B·H·L²·D over ${cost.attention_calls} attention calls: QKᵀ and PV)` +
        (ffn ? `, ${(fl / ffn).toFixed(fl / ffn < 0.1 ? 3 : 2)}× the feed-forward layers' ${int(ffn)}.` : ".") }));
    box.appendChild(el("p", { "data-role": "cost-kv", "data-value": String(kv.bytes),
      text: `KV cache for ${cost.length} tokens: ${int(kv.bytes)} bytes (${bytes(kv.bytes)}) = 2 (K and V) × ${kv.layers} layers × ` +
        `${kv.kv_heads} KV heads × ${kv.head_dim} dims × ${cost.length} tokens × ${kv.dtype}` +
        (kv.decoder ? "." : ". This model is an encoder and keeps no cache; a decoder of its shape would hold this.") }));
    const growth = el("div", { class: "akc-growth" }, [growthChart(cost)]);
    const last = cost.growth[cost.growth.length - 1], first = cost.growth[0];
    const cross = cost.crossover;
    growth.appendChild(el("p", { class: "akx-hint", text: `Attention's share of the forward goes from ${pct(first.attention_share)} at ` +
      `${first.length} tokens to ${pct(last.attention_share)} at ${last.length} (its FLOPs grow as L², the feed-forward's as L). ` +
      (cross.measured != null ? `It costs more than the feed-forward layers from ${cross.measured} tokens (measured). ` : "") +
      (cross.predicted != null ? `From the FLOPs it overtakes them at about ${Math.round(cross.predicted)} tokens. ` : "") +
      "Quick timings: attnkit profile measures properly." }));
    box.appendChild(growth);
    return box;
  }

  window.AttnkitCost = { section, svg, el };
})();
