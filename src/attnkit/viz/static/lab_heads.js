/* attnkit lab, panel "heads": multi-head attention with grouped K/V, as attnkit.nn.MultiHeadAttention
 * computes it (bias=False), on the lab's tokens and its causal toggle.
 *
 *   x      (n, E)            token embeddings, E = d_model = 8
 *   W_q    (H*D, E)          torch's nn.Linear layout: q = x W_q^T, cut into H heads of D = E / H
 *                            (H = 1, 2 or 4: H x D = d_model)
 *   W_k, W_v (Hkv*D, E)      Hkv = H (MHA), a divisor of H (GQA) or 1 (MQA): query head h
 *                            reads K/V head floor(h / (H / Hkv))
 *   p_h    = softmax(q_h k_g^T / sqrt(D) + causal mask)      one n x n pattern per head
 *   out    = concat_h(p_h v_g) W_o^T,  W_o (E, H*D)
 *
 * Two presets. "random": x and the weights drawn from the seed, so the heads look alike.
 * "roles": four MHA heads built to do one job each, on x_i = [cos(i t), sin(i t), [i = 0], 1,
 * cos(f_w), sin(f_w), 0, 0] with t = pi/12 and f_w = 2 pi w / 12 for the w-th distinct word
 * (lower-cased, in order of first use):
 *   head 0, previous token   q_i = A R(-t) (cos(i t), sin(i t)), k_j = (cos(j t), sin(j t)):
 *                            q_i . k_j = A cos((i - 1 - j) t), largest at j = i - 1
 *   head 1, first token      q_i = (B, 0), k_j = ([j = 0], 0): only key 0 scores
 *   head 2, same word        q_i = C (cos f, sin f), k_j = (cos f, sin f): largest on every
 *                            copy of the query's own word (itself included)
 *   head 3, average          q_i = 0: every allowed key weighs the same
 * with A = 160, B = 6, C = 40; each head's value is the word's (cos f, sin f); W_o = I.
 *
 * The K/V cache holds Hkv heads instead of H: it shrinks by H / Hkv. The page's data gives
 * each preset model's cache from attnkit.nn.kv_cache_bytes with its KV heads and with all heads.
 *
 * api: state() {preset, heads, kvHeads, seed, x, wq, wk, wv, wo}; set(partial) -> state(), any
 *   of those keys: {preset: "roles"} builds the roles; a new heads/kvHeads/seed draws random
 *   weights unless they are given (a new heads without kvHeads gives MHA);
 *   result() {probs: H x n x n, heads: H x n x D, concat: n x H*D, out: n x E, roles: H names or null}
 */
"use strict";
(() => {
  const E = 8, HEAD_COUNTS = [1, 2, 4];
  const ROLES = ["previous token", "first token", "same word", "average"];
  const TURN = Math.PI / 12, A = 160, B = 6, C = 40;

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
  const dot = (a, b, from, to, length) => { let s = 0; for (let c = 0; c < length; c++) s += a[from + c] * b[to + c]; return s; };

  function compute(s, causal) {
    const n = s.x.length, group = s.heads / s.kvHeads, D = E / s.heads;
    const q = matmulT(s.x, s.wq), k = matmulT(s.x, s.wk), v = matmulT(s.x, s.wv);
    const probs = [], heads = [];
    for (let h = 0; h < s.heads; h++) {
      const g = Math.floor(h / group), qs = h * D, ks = g * D;
      const p = q.map((qi, i) => {
        const row = k.map((kj, j) => (causal && j > i ? -Infinity : dot(qi, kj, qs, ks, D) / Math.sqrt(D)));
        const m = Math.max(...row), e = row.map((x) => Math.exp(x - m)), total = e.reduce((a, b) => a + b, 0);
        return e.map((x) => x / total);
      });
      probs.push(p);
      heads.push(p.map((row) => Array.from({ length: D }, (_, c) => row.reduce((a, pj, j) => a + pj * v[j][ks + c], 0))));
    }
    const concat = Array.from({ length: n }, (_, i) => heads.flatMap((h) => h[i]));
    return { probs, heads, concat, out: matmulT(concat, s.wo), roles: s.preset === "roles" ? ROLES.slice() : null };
  }

  function draw(seed, heads, kvHeads, n) {
    const D = E / heads;
    return { preset: "random", heads, kvHeads, seed, x: drawMatrix(seed, 0, n, E), wq: drawMatrix(seed, 1, heads * D, E),
      wk: drawMatrix(seed, 2, kvHeads * D, E), wv: drawMatrix(seed, 3, kvHeads * D, E), wo: drawMatrix(seed, 4, E, heads * D) };
  }

  // -- the "roles" preset (see the header) -----------------------------------------------
  function roleInputs(tokens) {
    const words = [];
    return tokens.map((token, i) => {
      const word = token.toLowerCase();
      if (!words.includes(word)) words.push(word);
      const f = (2 * Math.PI * words.indexOf(word)) / 12;
      return [Math.cos(i * TURN), Math.sin(i * TURN), i === 0 ? 1 : 0, 1, Math.cos(f), Math.sin(f), 0, 0];
    });
  }

  function roles(tokens, seed) {
    const unit = (c, scale = 1) => Array.from({ length: E }, (_, j) => (j === c ? scale : 0));
    const zero = () => new Array(E).fill(0), cos = Math.cos(TURN), sin = Math.sin(TURN);
    const rotated = [[A * cos, A * sin, 0, 0, 0, 0, 0, 0], [-A * sin, A * cos, 0, 0, 0, 0, 0, 0]];  // A R(-t) on dims 0, 1
    return {
      preset: "roles", heads: 4, kvHeads: 4, seed, x: roleInputs(tokens),
      wq: [...rotated, unit(3, B), zero(), unit(4, C), unit(5, C), zero(), zero()],
      wk: [unit(0), unit(1), unit(2), zero(), unit(4), unit(5), unit(4), unit(5)],
      wv: Array.from({ length: E }, (_, r) => unit(4 + (r % 2))),
      wo: Array.from({ length: E }, (_, r) => unit(r)),
    };
  }

  function make(kit) {
    const { el, fmt, rgb, ramp, diverging, ink, BLUE, shown } = kit;
    const presets = kit.initial?.cost?.presets ?? [];
    let s = null, lab = null;
    const ui = {
      preset: el("select", { "data-akl": "heads-preset", "aria-label": "heads preset" },
        el("option", { value: "roles", text: "roles: previous token, first token, same word, average" }),
        el("option", { value: "random", text: "random weights (from the seed)" })),
      heads: el("select", { "data-akl": "heads", "aria-label": "heads" },
        ...HEAD_COUNTS.map((h) => el("option", { value: String(h), text: `${h} (D = ${E / h})` }))),
      kv: el("select", { "data-akl": "kv-heads", "aria-label": "K/V heads" }),
      seed: el("input", { type: "number", min: "0", step: "1", "data-akl": "heads-seed", "aria-label": "weights seed" }),
      patterns: el("div", { class: "akl-heads-patterns", "data-akl": "head-patterns" }),
      out: el("table", { class: "akl-matrix", "data-akl": "heads-out" }),
      outFormula: el("code", { "data-akl": "heads-out-formula" }),
      saving: el("p", { class: "akl-heads-saving", "data-akl": "kv-saving" }),
    };
    const control = (name, ...inputs) => el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: name }),
      el("span", { class: "akl-control-inputs" }, ...inputs));
    const node = el("section", { class: "akl-panel akl-heads", "data-akl": "heads-panel" },
      el("h2", { text: "Several heads: each its own W_q, W_k, W_v; concatenated, then W_o" }),
      el("p", { class: "akl-hint", text: `d_model = ${E}, split into H heads of D = ${E}/H numbers (H \u00d7 D = d_model); `
        + "the lab's causal toggle applies. The roles preset builds x and the weights so that each head does one job; "
        + "random weights give heads that look alike. Heads that share a K/V head (GQA; MQA when there is one) read the same keys and values." }),
      el("div", { class: "akl-flash-controls" }, control("preset", ui.preset), control("heads H", ui.heads), control("K/V heads", ui.kv),
        control("weights seed", ui.seed)),
      ui.patterns, el("h3", {}, el("span", { text: "output" }), ui.outFormula), ui.out, ui.saving);

    function heatmap(tokens, p, title, causal) {
      const cell = (x, masked) => {
        if (masked) return el("td", { class: "akl-masked", title: "masked" });
        const c = ramp(BLUE, x);
        return el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(x), text: fmt(x) });
      };
      const keys = el("tr", {}, el("th", { class: "akl-corner", text: "q \\ k" }),
        ...tokens.map((t) => el("th", { "data-akl": "head-key", title: t, text: t })));
      const body = el("tbody", {}, ...p.map((row, i) => el("tr", {}, el("th", { title: tokens[i], text: tokens[i] }),
        ...row.map((x, j) => cell(x, causal && j > i)))));
      return el("div", { class: "akl-box", "data-akl": "head-pattern" }, el("h3", {}, el("span", { text: title })),
        el("table", { class: "akl-matrix akl-small-matrix" }, el("thead", {}, keys), body));
    }

    const bytesText = window.AttnkitUnits.bytes;  // units.js
    const AT = (kit.initial?.cost?.lengths ?? []).indexOf(4096);  // the lengths where kv_bytes were taken

    // what sharing K/V saves, for the variant shown, with the preset models of that variant
    function savingText() {
      const H = s.heads, G = s.kvHeads, D = E / H;
      const models = (keep) => presets.filter((p) => keep(p) && !p.encoder);
      if (G === H) {
        const mha = models((p) => p.kv_heads === p.heads).map((p) => p.name);
        return `MHA: each of the ${H} heads keeps its own K and V, 2\u00b7${H}\u00b7${D} = ${2 * H * D} numbers per token `
          + `per layer: no saving.${mha.length ? ` ${mha.join(", ")} are built this way.` : ""}`;
      }
      const kind = G === 1 ? "MQA" : "GQA";
      const own = `${kind}: ${H} query heads share ${G} K/V head${G > 1 ? "s" : ""}, so the cache holds 2\u00b7${G}\u00b7${D} `
        + `numbers per token per layer instead of 2\u00b7${H}\u00b7${D}: ${H / G}\u00d7 smaller.`;
      const same = models((p) => (G === 1 ? p.kv_heads === 1 : p.kv_heads > 1 && p.kv_heads < p.heads))
        .map((p) => `${p.name} (${p.heads} query heads, ${p.kv_heads} K/V) ${bytesText(p.kv_bytes[AT])} instead of ${bytesText(p.kv_bytes_mha[AT])}`);
      return same.length ? `${own} At 4096 tokens (float16, kv_cache_bytes), ${kind} models: ${same.join("; ")}.` : own;
    }

    function headTitle(h, group) {
      return `head ${h}${s.preset === "roles" ? ` \u00b7 ${ROLES[h]}` : ""} \u00b7 K/V ${Math.floor(h / group)}`;
    }

    function update(state) {
      lab = state;
      const n = state.tokens.length;
      if (s === null) s = roles(state.tokens, 0);
      else if (s.preset === "roles") s = { ...s, x: roleInputs(state.tokens) };
      else if (s.x.length !== n) s = { ...s, x: drawMatrix(s.seed, 0, n, E) };
      const r = compute(s, state.causal), group = s.heads / s.kvHeads;
      ui.preset.value = s.preset;
      ui.heads.value = String(s.heads);
      ui.kv.replaceChildren(...HEAD_COUNTS.filter((g) => g <= s.heads && s.heads % g === 0).map((g) =>
        el("option", { value: String(g), text: g === s.heads ? `${g} (MHA)` : g === 1 ? "1 (MQA)" : `${g} (GQA)` })));
      ui.kv.value = String(s.kvHeads);
      ui.seed.value = String(s.seed);
      ui.patterns.replaceChildren(...r.probs.map((p, h) => heatmap(state.tokens, p, headTitle(h, group), state.causal)));
      const head = el("tr", {}, el("th", { text: "" }), ...Array.from({ length: E }, (_, c) => el("th", { text: `y${c}` })));
      const top = Math.max(...r.out.flat().map(Math.abs), 1e-12);
      ui.out.replaceChildren(el("thead", {}, ...outGroups(), head), el("tbody", {}, ...r.out.map((row, i) => el("tr", {},
        el("th", { title: state.tokens[i], text: state.tokens[i] }),
        ...row.map((y) => { const c = diverging(y / top); return el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(y), text: fmt(y) }); })))));
      ui.outFormula.textContent = "concat(p_h\u00b7v_g)\u00b7W_o\u1d40"
        + (s.preset === "roles" ? ", W_o = I here: each head's D columns are its own output" : "");
      ui.saving.textContent = savingText();
    }

    // the roles preset's W_o is the identity, so y columns 2h and 2h + 1 are head h's own output
    function outGroups() {
      if (s.preset !== "roles") return [];
      return [el("tr", {}, el("th", {}), ...ROLES.map((role, h) =>
        el("th", { colspan: String(E / s.heads), class: "akl-flash-group", "data-akl": "heads-out-group", title: role, text: `head ${h}` })))];
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
      if ("preset" in patch && patch.preset !== "roles" && patch.preset !== "random")
        throw new RangeError(`preset must be "roles" or "random"; got ${shown(patch.preset)}`);
      const heads = patch.heads ?? (patch.preset === "roles" ? 4 : s.heads);
      const kvHeads = patch.kvHeads ?? ("heads" in patch || patch.preset === "roles" ? heads : s.kvHeads);
      const seed = patch.seed ?? s.seed;
      if (!HEAD_COUNTS.includes(heads)) throw new RangeError(`heads must be one of ${HEAD_COUNTS.join(", ")} (H x D = d_model = ${E}); got ${shown(heads)}`);
      if (!Number.isInteger(kvHeads) || kvHeads < 1 || heads % kvHeads) throw new RangeError(`kvHeads must divide heads = ${heads}; got ${shown(kvHeads)}`);
      if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) throw new RangeError(`seed must be an integer in [0, 2**32); got ${shown(seed)}`);
      const preset = patch.preset ?? (heads !== s.heads || kvHeads !== s.kvHeads || seed !== s.seed ? "random" : s.preset);
      if (preset === "roles" && (heads !== 4 || kvHeads !== 4)) throw new RangeError(`the roles preset has 4 heads, each its own K/V; got heads ${heads}, kvHeads ${kvHeads}`);
      const n = lab.tokens.length, D = E / heads;
      const redraw = preset !== s.preset || heads !== s.heads || kvHeads !== s.kvHeads || seed !== s.seed;
      const base = !redraw ? s : preset === "roles" ? roles(lab.tokens, seed) : draw(seed, heads, kvHeads, n);
      s = { preset, heads, kvHeads, seed,
        x: "x" in patch ? checkWeights("x", patch.x, n, E) : base.x,
        wq: "wq" in patch ? checkWeights("wq", patch.wq, heads * D, E) : base.wq,
        wk: "wk" in patch ? checkWeights("wk", patch.wk, kvHeads * D, E) : base.wk,
        wv: "wv" in patch ? checkWeights("wv", patch.wv, kvHeads * D, E) : base.wv,
        wo: "wo" in patch ? checkWeights("wo", patch.wo, E, heads * D) : base.wo };
      if (s.preset === "roles" && ["x", "wq", "wk", "wv", "wo"].some((key) => key in patch)) s.preset = "random";
      update(lab);
      return api.state();
    }

    const api = { state: () => JSON.parse(JSON.stringify(s)), set, result: () => compute(s, lab.causal) };

    node.addEventListener("input", (event) => {
      const kind = event.target.dataset.akl, value = Number(event.target.value);
      if (kind === "heads-preset") set({ preset: event.target.value });
      else if (kind === "heads") set({ heads: value });
      else if (kind === "kv-heads") set({ kvHeads: value });
      else if (kind === "heads-seed" && Number.isInteger(value) && value >= 0 && value <= 4294967295) set({ seed: value });
    });
    return { name: "heads", node, update, api };
  }

  (window.AttnkitLabPanels = window.AttnkitLabPanels ?? []).push(make);
})();
