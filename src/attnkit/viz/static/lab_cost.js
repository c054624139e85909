/* attnkit lab, panel "cost": what a sequence length n costs, per layer and per head.
 *
 *   full attention      n^2 scores; materialised in float32: 4 n^2 bytes
 *   FlashAttention      the same n^2 scores computed, never stored: a running max and sum
 *                       per query, 2 n float32 numbers (8 n bytes), plus one tile
 *   sliding window w    n * min(n, w) scores
 *   linear attention    n * d numbers of features (d = the preset's head dim), no n x n at all
 *   KV cache            the preset model's, in float16, from attnkit.nn.kv_cache_bytes; an
 *                       encoder preset (MiniLM) keeps none, and the page says so
 *
 * Beside the table, a log-log growth curve of the bytes: the materialised n x n scores,
 * FlashAttention's 2n running numbers and the preset's KV cache, with the chosen n marked and
 * the lengths past the preset's context window shaded (those lengths are flagged in words too).
 *
 * The page has no model knowledge of its own: the lengths, presets and cache sizes come in
 * the page's data as `cost` = {lengths, presets: [{name, layers, heads, kv_heads, head_dim,
 * window, context, encoder, kv_bytes: [one per length]}], bench: null | {machine, rows: [{case,
 * length, impl, ms}]}}, written by attnkit.viz.lab. Without `cost` the panel is not shown.
 *
 * api: state() {length, preset, window}; set({length?, preset?, window?}) -> state();
 *   result() {length, scores, scoreBytes, flashBytes, windowScores, linearNumbers, kvBytes,
 *   encoder, context, pastContext, measured}: kvBytes is what a cache of the preset's shape
 *   holds (an encoder keeps none: encoder is true); context is the preset's context window
 *   or null, pastContext whether n exceeds it
 */
"use strict";
(() => {
  const WORDS = [[1e12, "trillion"], [1e9, "billion"], [1e6, "million"], [1e3, "thousand"]];

  function count(x) {
    const whole = Math.round(x).toLocaleString("en-US");
    const word = WORDS.find(([size]) => x >= size);
    return word ? `${whole} (${(x / word[0]).toPrecision(3)} ${word[1]})` : whole;
  }

  const { bytes } = window.AttnkitUnits;  // units.js

  const lengthName = (n) => (n >= 1024 ? `${n / 1024}K` : String(n));

  function make(kit) {
    const data = kit.initial?.cost;
    if (!data) return null;
    const { el, shown } = kit;
    let index = data.lengths.indexOf(4096), preset = 0, window = 4096;
    const ui = {
      length: el("input", { type: "range", min: "0", max: String(data.lengths.length - 1), step: "1", "data-akl": "cost-length", "aria-label": "sequence length" }),
      lengthText: el("output", { class: "akl-readout", "data-akl": "cost-length-text" }),
      preset: el("select", { "data-akl": "cost-preset", "aria-label": "model preset" },
        ...data.presets.map((p, i) => el("option", { value: String(i), text: p.name }))),
      window: el("input", { type: "range", min: "4", max: "17", step: "1", "data-akl": "cost-window", "aria-label": "window" }),
      windowText: el("output", { class: "akl-readout", "data-akl": "cost-window-text" }),
      table: el("table", { class: "akl-cost-table", "data-akl": "cost-table" }),
      curve: el("canvas", { class: "akl-cost-curve", "data-akl": "cost-curve", "aria-label": "bytes against length, log-log" }),
      flags: el("p", { class: "akl-cost-flags", "data-akl": "cost-flags" }),
      measured: el("div", { class: "akl-cost-measured", "data-akl": "cost-measured" }),
    };
    const control = (name, ...inputs) => el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: name }),
      el("span", { class: "akl-control-inputs" }, ...inputs));
    const node = el("section", { class: "akl-panel akl-cost", "data-akl": "cost" },
      el("h2", { text: "The cost of length: one layer and head, and the KV cache of a whole model" }),
      el("div", { class: "akl-flash-controls" },
        control("length n", ui.length, ui.lengthText), control("window w", ui.window, ui.windowText),
        control("KV cache of", ui.preset)),
      ui.flags, el("div", { class: "akl-cost-body" }, ui.table, ui.curve), ui.measured);

    function compute() {
      const n = data.lengths[index], p = data.presets[preset];
      const measured = data.bench ? data.bench.rows.filter((r) => r.length === n) : [];
      return { length: n, scores: n * n, scoreBytes: 4 * n * n, flashBytes: 8 * n, windowScores: n * Math.min(n, window),
        linearNumbers: n * p.head_dim, kvBytes: p.kv_bytes[index], encoder: p.encoder, context: p.context,
        pastContext: p.context !== null && n > p.context, measured };
    }

    function flagText(r, p) {
      const flags = [];
      if (r.pastContext) flags.push(`n = ${lengthName(r.length)} is past ${p.name}'s ${p.context.toLocaleString("en-US")}-token `
        + "context window (from its config): the model is not made to read texts this long "
        + "(shaded in the curve).");
      if (p.encoder) flags.push(`${p.name} is an encoder: it reads the whole text at once and generates nothing, so it keeps `
        + "no KV cache. The row below gives what a cache of its shape would hold.");
      return flags.join(" ");
    }

    const SERIES = [
      { name: "materialised scores, 4n\u00b2 (one layer, one head)", colour: "#dc2626", bytes: (n) => 4 * n * n },
      { name: "FlashAttention, 8n (one layer, one head)", colour: "#2563eb", bytes: (n) => 8 * n },
    ];

    function drawCurve(r, p) {
      const canvas = ui.curve, width = canvas.clientWidth, height = canvas.clientHeight;
      if (!width || !height) return;  // hidden (a tab not shown): the ResizeObserver redraws later
      const dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const lengths = data.lengths, kv = { name: `KV cache, ${p.name}, all layers${p.encoder ? " (if it kept one)" : ""}`, colour: "#059669",
        bytes: (n) => p.kv_bytes[lengths.indexOf(n)], dashed: p.encoder };
      const series = [...SERIES, kv], all = series.flatMap((s) => lengths.map(s.bytes));
      const left = 58, right = width - 10, top = 12 + 15 * series.length, bottom = height - 34;  // the legend above
      const [x0, x1] = [Math.log2(lengths[0]), Math.log2(lengths[lengths.length - 1])];
      const [y0, y1] = [Math.floor(Math.log2(Math.min(...all))), Math.ceil(Math.log2(Math.max(...all)))];
      const X = (n) => left + ((Math.log2(n) - x0) / (x1 - x0)) * (right - left);
      const Y = (b) => bottom - ((Math.log2(b) - y0) / (y1 - y0)) * (bottom - top);
      if (p.context !== null && p.context < lengths[lengths.length - 1]) {
        ctx.fillStyle = "rgba(245, 158, 11, 0.15)";
        ctx.fillRect(X(p.context), top, right - X(p.context), bottom - top);
        ctx.fillStyle = "#92400e"; ctx.font = "11px system-ui, sans-serif";
        const label = `past ${p.context.toLocaleString("en-US")} tokens`;
        const inside = X(p.context) + 4 + ctx.measureText(label).width <= right;  // else left of the edge
        ctx.textAlign = inside ? "left" : "right";
        ctx.fillText(label, inside ? X(p.context) + 4 : X(p.context) - 4, top + 12);
      }
      ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#6b7280"; ctx.lineWidth = 1; ctx.font = "11px system-ui, sans-serif";
      for (let e = Math.ceil(y0 / 10) * 10; e <= y1; e += 10) {  // 1 KiB, 1 MiB, 1 GiB...
        ctx.beginPath(); ctx.moveTo(left, Y(2 ** e)); ctx.lineTo(right, Y(2 ** e)); ctx.stroke();
        ctx.textAlign = "right"; ctx.fillText(bytes(2 ** e), left - 6, Y(2 ** e) + 4);
      }
      ctx.textAlign = "center";
      for (const n of lengths.filter((_, i) => i % 2 === 0)) ctx.fillText(lengthName(n), X(n), bottom + 14);
      ctx.fillText("length n (tokens), log scale", (left + right) / 2, bottom + 28);
      ctx.textAlign = "right";
      ctx.fillText("bytes", left - 6, top - 4);
      for (const s of series) {
        ctx.strokeStyle = s.colour; ctx.lineWidth = 2; ctx.setLineDash(s.dashed ? [5, 4] : []);
        ctx.beginPath();
        lengths.forEach((n, i) => (i ? ctx.lineTo(X(n), Y(s.bytes(n))) : ctx.moveTo(X(n), Y(s.bytes(n)))));
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = s.colour;
        ctx.beginPath(); ctx.arc(X(r.length), Y(s.bytes(r.length)), 4, 0, 2 * Math.PI); ctx.fill();
      }
      ctx.strokeStyle = "#111827"; ctx.lineWidth = 1; ctx.setLineDash([2, 3]);
      ctx.beginPath(); ctx.moveTo(X(r.length), top); ctx.lineTo(X(r.length), bottom); ctx.stroke();
      ctx.setLineDash([]);
      drawLegend(ctx, series, left);
    }

    // one line per series, above the plot, so that no curve runs under the text
    function drawLegend(ctx, series, left) {
      ctx.textAlign = "left"; ctx.font = "12px system-ui, sans-serif";
      series.forEach((s, i) => {
        ctx.fillStyle = s.colour; ctx.fillRect(left, 6 + 15 * i, 14, 3);
        ctx.fillText(s.name, left + 20, 12 + 15 * i);
      });
    }

    function row(name, figure, note) {
      return el("tr", {}, el("th", { text: name }), el("td", { text: figure }), el("td", { class: "akl-hint", text: note }));
    }

    function update() {
      const r = compute(), p = data.presets[preset];
      ui.length.value = String(index);
      ui.lengthText.textContent = `${lengthName(r.length)} tokens`;
      ui.preset.value = String(preset);
      ui.window.value = String(Math.log2(window));
      ui.windowText.textContent = lengthName(window);
      ui.table.replaceChildren(el("tbody", {},
        row("scores, full attention", count(r.scores), "n\u00b2: every query against every key"),
        row("materialised scores", bytes(r.scoreBytes), "float32 n\u00d7n matrix, if it is stored"),
        row("FlashAttention holds", bytes(r.flashBytes), "running max and sum per query (2n float32): O(n); the n\u00b2 scores are computed, never stored"),
        row(`sliding window, w = ${lengthName(window)}`, count(r.windowScores), "n\u00b7min(n, w) scores"),
        row("linear attention", count(r.linearNumbers), `n\u00b7d feature numbers, d = ${p.head_dim}: no n\u00d7n at all`),
        row(`KV cache, ${p.name}`, r.encoder ? "none: an encoder" : bytes(r.kvBytes),
          (r.encoder ? `a cache of its shape would hold ${bytes(r.kvBytes)}: ` : "")
          + `float16, batch 1: 2\u00b7${p.layers} layers\u00b7${p.kv_heads} KV heads\u00b7${p.head_dim}\u00b7n`
          + (p.window ? `, capped at its ${p.window}-token window` : "") + " (all layers)")));
      ui.flags.textContent = flagText(r, p);
      ui.flags.hidden = !ui.flags.textContent;
      drawCurve(r, p);
      if (!data.bench) {
        ui.measured.textContent = "No measured timings in this page (write it with attnkit lab --bench RESULTS.json).";
      } else if (!r.measured.length) {
        ui.measured.textContent = `No measured timing at n = ${r.length} on ${data.bench.machine}.`;
      } else {
        ui.measured.replaceChildren(el("span", { text: `Measured at n = ${r.length} on ${data.bench.machine}: ` }),
          ...r.measured.map((m) => el("span", { class: "akl-cost-time", text: `${m.case} ${m.impl} ${m.ms.toPrecision(3)} ms` })));
      }
    }

    function set(patch) {
      if (patch === null || typeof patch !== "object" || Array.isArray(patch))
        throw new TypeError(`cost.set() takes {length, preset, window}; got ${shown(patch)}`);
      const next = "length" in patch ? data.lengths.indexOf(patch.length) : index;
      if (next < 0) throw new RangeError(`length must be one of ${data.lengths.join(", ")}; got ${shown(patch.length)}`);
      const p = "preset" in patch ? data.presets.findIndex((q) => q.name === patch.preset) : preset;
      if (p < 0) throw new RangeError(`preset must be one of ${data.presets.map((q) => q.name).join(", ")}; got ${shown(patch.preset)}`);
      const w = "window" in patch ? patch.window : window;
      if (!data.lengths.includes(w)) throw new RangeError(`window must be one of ${data.lengths.join(", ")}; got ${shown(w)}`);
      index = next; preset = p; window = w;
      update();
      return api.state();
    }

    const api = {
      state: () => ({ length: data.lengths[index], preset: data.presets[preset].name, window }),
      set, result: compute,
    };

    node.addEventListener("input", (event) => {
      const kind = event.target.dataset.akl, value = Number(event.target.value);
      if (kind === "cost-length") set({ length: data.lengths[value] });
      else if (kind === "cost-window") set({ window: 2 ** value });
      else if (kind === "cost-preset") set({ preset: data.presets[value].name });
    });
    update();
    if (typeof ResizeObserver === "function") new ResizeObserver(() => drawCurve(compute(), data.presets[preset])).observe(ui.curve);
    return { name: "cost", node, update: () => {}, api };
  }

  (window.AttnkitLabPanels = window.AttnkitLabPanels ?? []).push(make);
})();
