/* attnkit lab, panel "heads": multi-head attention with grouped K/V, as attnkit.nn.MultiHeadAttention
 * computes it (bias=False), on the lab's tokens and its causal toggle.
 *
 *   x      (n, E)            token embeddings drawn from the panel's seed, E = 4
 *   W_q    (H*D, E)          torch's nn.Linear layout: q = x W_q^T, cut into H heads of D = 2
 *   W_k, W_v (Hkv*D, E)      Hkv = H (MHA), a divisor of H (GQA) or 1 (MQA): query head h
 *                            reads K/V head floor(h / (H / Hkv))
 *   p_h    = softmax(q_h k_g^T / sqrt(D) + causal mask)      one n x n pattern per head
 *   out    = concat_h(p_h v_g) W_o^T,  W_o (E, H*D)
 *
 * The K/V cache holds Hkv heads instead of H: it shrinks by H / Hkv. The page's data gives
 * each preset's cache from attnkit.nn.kv_cache_bytes with its KV heads and with all heads.
 *
 * api: state() {heads, kvHeads, seed, x, wq, wk, wv, wo}; set(partial) -> state(), any of
 *   those keys (a new heads/kvHeads/seed redraws the weights unless they are given; a new
 *   heads without kvHeads gives MHA);
 *   result() {probs: H x n x n, heads: H x n x D, concat: n x H*D, out: n x E}
 */
"use strict";
(() => {
  const E = 4, D = 2, MAX_HEADS = 4;

  function mix32(h) {
    h ^= h >>> 16; h = Math.imul(h, 0x7feb352d);
    h ^= h >>> 15; h = Math.imul(h, 0x846ca68b);
    return (h ^ (h >>> 16)) >>> 0;
  }

  function drawMatrix(seed, role, rows, cols) {  // uniform in [-1, 1] on a 0.01 grid
    return Array.from({ length: rows }, (_, r) => Array.from({ length: cols }, (_, c) => {
      let h = 0x85ebca6b;
      for (const w of [seed, role, r, c]) h = mix32(h ^ mix32(w >>> 0));
      return Math.round(((h + 0.5) / 4294967296) * 200 - 100) / 100 || 0;
    }));
  }

  const matmulT = (a, w) => a.map((row) => w.map((wr) => wr.reduce((s, x, c) => s + x * row[c], 0)));  // a w^T

  function compute(s, causal) {
    const n = s.x.length, group = s.heads / s.kvHeads;
    const q = matmulT(s.x, s.wq), k = matmulT(s.x, s.wk), v = matmulT(s.x, s.wv);
    const probs = [], heads = [];
    for (let h = 0; h < s.heads; h++) {
      const g = Math.floor(h / group), qs = h * D, ks = g * D;
      const p = q.map((qi, i) => {
        const row = k.map((kj, j) => (causal && j > i ? -Infinity
          : (qi[qs] * kj[ks] + qi[qs + 1] * kj[ks + 1]) / Math.sqrt(D)));
        const m = Math.max(...row), e = row.map((x) => Math.exp(x - m)), total = e.reduce((a, b) => a + b, 0);
        return e.map((x) => x / total);
      });
      probs.push(p);
      heads.push(p.map((row) => [0, 1].map((c) => row.reduce((a, pj, j) => a + pj * v[j][ks + c], 0))));
    }
    const concat = Array.from({ length: n }, (_, i) => heads.flatMap((h) => h[i]));
    return { probs, heads, concat, out: matmulT(concat, s.wo) };
  }

  function draw(seed, heads, kvHeads, n) {
    return { heads, kvHeads, seed, x: drawMatrix(seed, 0, n, E), wq: drawMatrix(seed, 1, heads * D, E),
      wk: drawMatrix(seed, 2, kvHeads * D, E), wv: drawMatrix(seed, 3, kvHeads * D, E), wo: drawMatrix(seed, 4, E, heads * D) };
  }

  function make(kit) {
    const { el, fmt, rgb, ramp, diverging, ink, BLUE, shown } = kit;
    const presets = kit.initial?.cost?.presets ?? [];
    let s = null, lab = null;
    const ui = {
      heads: el("input", { type: "range", min: "1", max: String(MAX_HEADS), step: "1", "data-akl": "heads", "aria-label": "heads" }),
      headsText: el("output", { class: "akl-readout akl-short", "data-akl": "heads-text" }),
      kv: el("select", { "data-akl": "kv-heads", "aria-label": "K/V heads" }),
      seed: el("input", { type: "number", min: "0", step: "1", "data-akl": "heads-seed", "aria-label": "weights seed" }),
      patterns: el("div", { class: "akl-heads-patterns", "data-akl": "head-patterns" }),
      out: el("table", { class: "akl-matrix", "data-akl": "heads-out" }),
      saving: el("p", { class: "akl-heads-saving", "data-akl": "kv-saving" }),
    };
    const control = (name, ...inputs) => el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: name }),
      el("span", { class: "akl-control-inputs" }, ...inputs));
    const node = el("section", { class: "akl-panel akl-heads", "data-akl": "heads-panel" },
      el("h2", { text: "Several heads: each its own W_q, W_k, W_v; concatenated, then W_o" }),
      el("p", { class: "akl-hint", text: `Tokens x (${E} numbers each) and weights drawn from the seed; D = ${D} per head; `
        + "the lab's causal toggle applies. Heads that share a K/V head (GQA; MQA when there is one) read the same keys and values." }),
      el("div", { class: "akl-flash-controls" }, control("heads H", ui.heads, ui.headsText), control("K/V heads", ui.kv),
        control("weights seed", ui.seed)),
      ui.patterns, el("h3", {}, el("span", { text: "output" }), el("code", { text: "concat(p_h\u00b7v_g)\u00b7W_o\u1d40" })), ui.out, ui.saving);

    function heatmap(tokens, p, title, causal) {
      const body = el("tbody");
      const cell = (x, masked) => {
        if (masked) return el("td", { class: "akl-masked", title: "masked" });
        const c = ramp(BLUE, x);
        return el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(x), text: fmt(x) });
      };
      p.forEach((row, i) => body.append(el("tr", {}, el("th", { title: tokens[i], text: tokens[i] }),
        ...row.map((x, j) => cell(x, causal && j > i)))));
      return el("div", { class: "akl-box", "data-akl": "head-pattern" }, el("h3", {}, el("span", { text: title })),
        el("table", { class: "akl-matrix akl-small-matrix" }, body));
    }

    function savingText() {
      const own = `This layer's K/V cache holds ${s.kvHeads} of ${s.heads} heads: 2\u00b7${s.kvHeads}\u00b7${D} numbers per token instead of 2\u00b7${s.heads}\u00b7${D}`
        + (s.kvHeads < s.heads ? `, ${s.heads / s.kvHeads}\u00d7 smaller.` : " (MHA: nothing shared).");
      const gqa = presets.filter((p) => p.kv_heads < p.heads).map((p) => {
        const at = 8;  // index of 4096 in the cost panel's lengths, 16 * 2**8
        return `${p.name} ${bytesText(p.kv_bytes[at])} instead of ${bytesText(p.kv_bytes_mha[at])}`;
      });
      return gqa.length ? `${own} At 4096 tokens (float16, kv_cache_bytes): ${gqa.join("; ")}.` : own;
    }

    const bytesText = window.AttnkitUnits.bytes;  // units.js

    function update(state) {
      lab = state;
      const n = state.tokens.length;
      if (s === null || s.x.length !== n) s = s === null ? draw(0, 2, 2, n) : { ...s, x: drawMatrix(s.seed, 0, n, E) };
      const r = compute(s, state.causal), group = s.heads / s.kvHeads;
      ui.heads.value = String(s.heads);
      ui.headsText.textContent = String(s.heads);
      ui.kv.replaceChildren(...[1, 2, 4].filter((g) => g <= s.heads && s.heads % g === 0).map((g) =>
        el("option", { value: String(g), text: g === s.heads ? `${g} (MHA)` : g === 1 ? "1 (MQA)" : `${g} (GQA)` })));
      ui.kv.value = String(s.kvHeads);
      ui.seed.value = String(s.seed);
      ui.patterns.replaceChildren(...r.probs.map((p, h) => heatmap(state.tokens, p, `head ${h} \u00b7 K/V ${Math.floor(h / group)}`, state.causal)));
      const head = el("tr", {}, el("th", { text: "" }), ...Array.from({ length: E }, (_, c) => el("th", { text: `y${c}` })));
      const top = Math.max(...r.out.flat().map(Math.abs), 1e-12);
      ui.out.replaceChildren(el("thead", {}, head), el("tbody", {}, ...r.out.map((row, i) => el("tr", {},
        el("th", { title: state.tokens[i], text: state.tokens[i] }),
        ...row.map((y) => { const c = diverging(y / top); return el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(y), text: fmt(y) }); })))));
      ui.saving.textContent = savingText();
    }

    function checkWeights(name, m, rows, cols) {
      if (!Array.isArray(m) || m.length !== rows || m.some((row) => !Array.isArray(row) || row.length !== cols
        || row.some((x) => typeof x !== "number" || !Number.isFinite(x))))
        throw new RangeError(`${name} must be ${rows} rows of ${cols} finite numbers; got ${shown(m)}`);
      return m.map((row) => row.slice());
    }

    function set(patch) {
      if (patch === null || typeof patch !== "object" || Array.isArray(patch))
        throw new TypeError(`heads.set() takes an object; got ${shown(patch)}`);
      const heads = patch.heads ?? s.heads, kvHeads = patch.kvHeads ?? ("heads" in patch ? heads : s.kvHeads);
      const seed = patch.seed ?? s.seed;
      if (!Number.isInteger(heads) || heads < 1 || heads > MAX_HEADS) throw new RangeError(`heads must be an integer in [1, ${MAX_HEADS}]; got ${shown(heads)}`);
      if (!Number.isInteger(kvHeads) || kvHeads < 1 || heads % kvHeads) throw new RangeError(`kvHeads must divide heads = ${heads}; got ${shown(kvHeads)}`);
      if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) throw new RangeError(`seed must be an integer in [0, 2**32); got ${shown(seed)}`);
      const n = lab.tokens.length, redraw = heads !== s.heads || kvHeads !== s.kvHeads || seed !== s.seed;
      const base = redraw ? draw(seed, heads, kvHeads, n) : s;
      s = { heads, kvHeads, seed,
        x: "x" in patch ? checkWeights("x", patch.x, n, E) : base.x,
        wq: "wq" in patch ? checkWeights("wq", patch.wq, heads * D, E) : base.wq,
        wk: "wk" in patch ? checkWeights("wk", patch.wk, kvHeads * D, E) : base.wk,
        wv: "wv" in patch ? checkWeights("wv", patch.wv, kvHeads * D, E) : base.wv,
        wo: "wo" in patch ? checkWeights("wo", patch.wo, E, heads * D) : base.wo };
      update(lab);
      return api.state();
    }

    const api = { state: () => JSON.parse(JSON.stringify(s)), set, result: () => compute(s, lab.causal) };

    node.addEventListener("input", (event) => {
      const kind = event.target.dataset.akl, value = Number(event.target.value);
      if (kind === "heads") set({ heads: value });
      else if (kind === "kv-heads") set({ kvHeads: value });
      else if (kind === "heads-seed" && Number.isInteger(value) && value >= 0 && value <= 4294967295) set({ seed: value });
    });
    return { name: "heads", node, update, api };
  }

  (window.AttnkitLabPanels = window.AttnkitLabPanels ?? []).push(make);
})();
