/* attnkit lab: attention with sliders, computed live in the page, in float64.
 *
 *   s_ij = scale * (q_i . k_j) / T    null where the mask forbids (i, j)
 *   p_i  = softmax(s_i)               the row max is subtracted first; a row with no
 *                                     allowed key is all 0 (attnkit's rule)
 *   o_i  = sum_j p_ij v_j             so that row's output is 0 too
 *
 *   s_ij += bias_ij                   ALiBi; sinusoidal and RoPE change q and k first
 *
 * The mask allows (i, j) unless key j is padding, or causal and j > i, or a window w is
 * set and |i - j| > w (with causal: 0 <= i - j <= w).
 *
 * AttnkitLab.LIMITS {minTokens, maxTokens, maxLabel}: how many tokens a lab takes and the
 * longest label, in code points (serve's Lab tab cuts its text to them).
 * AttnkitLab.mount(root, initial) builds a lab inside `root` and returns its API, which
 * is also stored as window.attnkitLab:
 *   state()        {tokens, q, k, v, scale, temperature, causal, window, focus, padding,
 *                   position, slope, offset}
 *                  q, k, v: n x d arrays; window and focus: an int or null (off);
 *                  position: none, sinusoidal, rope or alibi; slope: ALiBi's, in [0, 4];
 *                  offset: the position of token 0 (see lab_positions.js)
 *   set(partial)   validates and merges any of those keys, redraws, moves the controls,
 *                  returns state(); throws TypeError/RangeError on a bad value
 *   result()       {scores, probs, out, entropy, entropyMax, q, k, pe, bias}: n x n, n x n, n x d,
 *                  n, n, then q and k after positions (n x d), the sinusoidal PE(p_i) added to
 *                  them (n x d) or null, and ALiBi's n x n bias or null; scores are null where
 *                  masked; entropies in bits
 *   panels         {name: api} of the panels below the lab (lab_flash.js and the others):
 *                  each panel file pushes a factory onto window.AttnkitLabPanels before this
 *                  file runs; mount calls factory(kit) -> {name, node, update(state, result), api}
 *                  or null (a panel whose data `initial` lacks)
 * `initial` is null or any part of a state, plus `head_dim` and `seed` for the starting
 * vectors that it does not give, and `tokens_from` (a str or null): where the token labels
 * came from, for the note that says they label random vectors ("given to attnkit lab", "the
 * words of the text box"). The standalone page mounts itself on #attnkit-lab with
 * the JSON in #attnkit-data. Text reaches the screen through textContent only.
 */
"use strict";
(() => {
  const MIN_TOKENS = 2, MAX_TOKENS = 12, MIN_DIM = 2, MAX_DIM = 8;
  const SLIDER = 3;           // vector sliders span [-SLIDER, SLIDER]
  const MAX_ABS = 1000;       // |vector entries| and |scale| accepted by set()
  const MIN_T = 1e-3, MAX_T = 1000;
  const MAX_LABEL = 64;
  const WORDS = ["The", "cat", "sat", "on", "the", "mat", "and", "then", "it", "slept", "all", "day"];
  const ROLES = ["q", "k", "v"];
  const ROLE_NAMES = { q: "query", k: "key", v: "value" };
  const STATE_KEYS = ["tokens", "q", "k", "v", "scale", "temperature", "causal", "window", "focus", "padding",
    "position", "slope", "offset"];
  const MAX_SLOPE = 4, MAX_OFFSET = 100000;
  const MANY = 8;             // more tokens than this: compact chips, the axis names above them (see lab.css)
  const MIN_CHIP_FONT = 9;    // px: the smallest a chip's label shrinks to (fitChips)
  const EVEN = 1.5;           // a focused row whose top weight is under EVEN / N is called near-uniform

  const MINUS = "\u2212";

  // -- the starting vectors: a hash of (seed, role, token, component), so a new token
  //    or a larger head dim draws from the same stream -------------------------------
  function mix32(h) {
    h ^= h >>> 16; h = Math.imul(h, 0x7feb352d);
    h ^= h >>> 15; h = Math.imul(h, 0x846ca68b);
    return (h ^ (h >>> 16)) >>> 0;
  }

  function uniform(...words) {  // in (0, 1)
    let h = 0x9e3779b9;
    for (const w of words) h = mix32(h ^ mix32(w >>> 0));
    return (h + 0.5) / 4294967296;
  }

  function draw(seed, role, i, c) {
    const r = ROLES.indexOf(role);
    const z = Math.sqrt(-2 * Math.log(uniform(seed, r, i, c, 1))) * Math.cos(2 * Math.PI * uniform(seed, r, i, c, 2));
    return onGrid(1.4 * z);  // sd 1.4 with d = 4 and scale 1/2: peaked rows, not one-hot
  }

  function onGrid(x) {  // clipped to the slider and rounded to its step
    const y = Math.round(Math.min(SLIDER, Math.max(-SLIDER, x)) * 100) / 100;
    return y === 0 ? 0 : y;
  }

  function labelFor(i) { return i < WORDS.length ? WORDS[i] : `t${i}`; }

  function resize(matrix, n, d, role, seed) {
    return Array.from({ length: n }, (_, i) =>
      Array.from({ length: d }, (_, c) => (i < matrix.length && c < matrix[i].length ? matrix[i][c] : draw(seed, role, i, c))));
  }

  // -- positions: token i sits at position p_i = offset + i ----------------------------
  //   none        q, k as edited
  //   sinusoidal  q_i + PE(p_i), k_i + PE(p_i); PE[p, 2c] = sin(p / 10000^(2c/d)) and
  //               PE[p, 2c+1] = cos(...), as attnkit.positions.sinusoidal (the lab has no
  //               embeddings, so PE is added to the vectors that stand for them)
  //   rope        q_i, k_i rotated by angle p_i * 10000^(-2c/d) on the pairs (x[c], x[c + d/2]):
  //               the "half" layout of attnkit.positions.RotaryEmbedding (GPT-NeoX, Llama in
  //               transformers); <R_a q, R_b k> depends only on a - b, so the offset changes nothing
  //   alibi       q, k as edited; bias_ij = -slope * |i - j| joins the scaled scores
  //               (attnkit.biases.alibi(slopes=[slope]))
  // sinusoidal and rope need an even d. place(state) -> {q, k, pe, bias}, pe and bias n x n or null.
  const KINDS = ["none", "sinusoidal", "rope", "alibi"];
  const BASE = 10000;

  const needsEven = (kind) => kind === "sinusoidal" || kind === "rope";

  function sinusoidal(p, d) {
    const pe = new Array(d);
    for (let c = 0; c < d; c += 2) {
      const angle = p / BASE ** (c / d);
      pe[c] = Math.sin(angle);
      pe[c + 1] = Math.cos(angle);
    }
    return pe;
  }

  function rotate(x, p) {  // the "half" layout: pair c is (x[c], x[c + d/2]), frequency 10000^(-2c/d)
    const d = x.length, h = d / 2, out = new Array(d);
    for (let c = 0; c < h; c++) {
      const angle = p * BASE ** (-(2 * c) / d), cos = Math.cos(angle), sin = Math.sin(angle);
      out[c] = x[c] * cos - x[c + h] * sin;
      out[c + h] = x[c + h] * cos + x[c] * sin;
    }
    return out;
  }

  function place(s) {
    const n = s.tokens.length, d = s.q[0].length, pos = (i) => s.offset + i;
    if (s.position === "sinusoidal") {
      const pe = s.q.map((_, i) => sinusoidal(pos(i), d));
      const add = (m) => m.map((row, i) => row.map((x, c) => x + pe[i][c]));
      return { q: add(s.q), k: add(s.k), pe, bias: null };
    }
    if (s.position === "rope") return { q: s.q.map((row, i) => rotate(row, pos(i))), k: s.k.map((row, i) => rotate(row, pos(i))), pe: null, bias: null };
    if (s.position === "alibi") {
      const bias = Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => -s.slope * Math.abs(i - j)));
      return { q: s.q, k: s.k, pe: null, bias };
    }
    return { q: s.q, k: s.k, pe: null, bias: null };
  }

  const POSITIONS = { KINDS, needsEven, place };

  // -- the math ---------------------------------------------------------------------
  function allowed(s, i, j) {
    if (s.padding[j]) return false;
    if (s.causal && j > i) return false;
    return s.window === null || Math.abs(i - j) <= s.window;
  }

  function compute(s) {
    const n = s.tokens.length, d = s.q[0].length;
    const { q, k, pe, bias } = POSITIONS.place(s);
    const scores = [], probs = [], out = [], entropy = [], entropyMax = [];
    for (let i = 0; i < n; i++) {
      const row = new Array(n).fill(null);
      let max = -Infinity, count = 0;
      for (let j = 0; j < n; j++) {
        if (!allowed(s, i, j)) continue;
        let dot = 0;
        for (let c = 0; c < d; c++) dot += q[i][c] * k[j][c];
        row[j] = (s.scale * dot) / s.temperature + (bias ? bias[i][j] : 0);
        max = Math.max(max, row[j]);
        count++;
      }
      const p = new Array(n).fill(0);
      if (count > 0) {
        let total = 0;
        for (let j = 0; j < n; j++) if (row[j] !== null) total += (p[j] = Math.exp(row[j] - max));
        for (let j = 0; j < n; j++) p[j] /= total;
      }
      const o = new Array(d).fill(0);
      let h = 0;
      for (let j = 0; j < n; j++) {
        if (p[j] === 0) continue;
        for (let c = 0; c < d; c++) o[c] += p[j] * s.v[j][c];
        h -= p[j] * Math.log2(p[j]);
      }
      scores.push(row); probs.push(p); out.push(o);
      entropy.push(Math.max(0, h));
      entropyMax.push(count > 0 ? Math.log2(count) : 0);
    }
    return { scores, probs, out, entropy, entropyMax, q, k, pe, bias };
  }

  // -- validating set() ---------------------------------------------------------------
  function shown(x) {
    try { return JSON.stringify(x) ?? String(x); } catch { return String(x); }
  }

  function checkTokens(tokens) {
    if (!Array.isArray(tokens) || tokens.some((t) => typeof t !== "string"))
      throw new TypeError(`tokens must be an array of strings; got ${shown(tokens)}`);
    if (tokens.length < MIN_TOKENS || tokens.length > MAX_TOKENS)
      throw new RangeError(`tokens must hold ${MIN_TOKENS} to ${MAX_TOKENS} labels; got ${tokens.length}`);
    const chars = tokens.map((t) => [...t].length);  // code points, as Python counts them
    const long = chars.findIndex((c) => c > MAX_LABEL);
    if (long >= 0) throw new RangeError(`tokens[${long}] must be at most ${MAX_LABEL} characters; got ${chars[long]}`);
    return tokens.slice();
  }

  function checkNumber(name, x, lo, hi) {
    if (typeof x !== "number" || !Number.isFinite(x)) throw new TypeError(`${name} must be a finite number; got ${shown(x)}`);
    if (x < lo || x > hi) throw new RangeError(`${name} must be in [${lo}, ${hi}]; got ${x}`);
    return x;
  }

  function checkMatrix(role, m, n, d) {
    if (!Array.isArray(m) || m.length !== n || m.some((row) => !Array.isArray(row) || row.length !== d))
      throw new RangeError(`${role} must be ${n} rows (one per token) of ${d} numbers; got ${shown(m)}`);
    return m.map((row, i) => row.map((x, c) => checkNumber(`${role}[${i}][${c}]`, x, -MAX_ABS, MAX_ABS)));
  }

  function checkIndexOrNull(name, x, n) {
    if (x === null) return null;
    if (!Number.isInteger(x) || x < 0 || x >= n)
      throw new RangeError(`${name} must be null or an integer in [0, ${n - 1}]; got ${shown(x)}`);
    return x;
  }

  function checkBool(name, x) {
    if (typeof x !== "boolean") throw new TypeError(`${name} must be true or false; got ${shown(x)}`);
    return x;
  }

  function checkPosition(x) {
    if (!POSITIONS.KINDS.includes(x)) throw new TypeError(`position must be one of ${POSITIONS.KINDS.join(", ")}; got ${shown(x)}`);
    return x;
  }

  function checkOffset(x) {
    if (!Number.isInteger(x) || x < 0 || x > MAX_OFFSET)
      throw new RangeError(`offset must be an integer in [0, ${MAX_OFFSET}]; got ${shown(x)}`);
    return x;
  }

  function merge(cur, patch, seed) {
    if (patch === null || typeof patch !== "object" || Array.isArray(patch))
      throw new TypeError(`set() takes an object with some of ${STATE_KEYS.join(", ")}; got ${shown(patch)}`);
    const unknown = Object.keys(patch).filter((key) => !STATE_KEYS.includes(key));
    if (unknown.length) throw new TypeError(`unknown state keys ${unknown.join(", ")}; expected some of ${STATE_KEYS.join(", ")}`);
    const tokens = "tokens" in patch ? checkTokens(patch.tokens) : cur.tokens.slice();
    const n = tokens.length;
    const given = ROLES.find((r) => r in patch);
    const d = given && Array.isArray(patch[given]) && Array.isArray(patch[given][0]) ? patch[given][0].length : cur.q[0].length;
    if (d < MIN_DIM || d > MAX_DIM) throw new RangeError(`vectors must have ${MIN_DIM} to ${MAX_DIM} components; got ${d}`);
    const next = { tokens };
    for (const r of ROLES) next[r] = r in patch ? checkMatrix(r, patch[r], n, d) : resize(cur[r], n, d, r, seed);
    if ("padding" in patch) {
      if (!Array.isArray(patch.padding) || patch.padding.length !== n)
        throw new RangeError(`padding must be ${n} booleans (true = key masked out); got ${shown(patch.padding)}`);
      next.padding = patch.padding.map((x, j) => checkBool(`padding[${j}]`, x));
    } else {
      next.padding = Array.from({ length: n }, (_, j) => j < cur.padding.length && cur.padding[j]);
    }
    next.scale = "scale" in patch ? checkNumber("scale", patch.scale, -MAX_ABS, MAX_ABS) : cur.scale;
    next.temperature = "temperature" in patch ? checkNumber("temperature", patch.temperature, MIN_T, MAX_T) : cur.temperature;
    next.causal = "causal" in patch ? checkBool("causal", patch.causal) : cur.causal;
    next.window = "window" in patch ? checkIndexOrNull("window", patch.window, n)
      : cur.window === null ? null : Math.min(cur.window, n - 1);
    next.position = "position" in patch ? checkPosition(patch.position) : cur.position;
    if (POSITIONS.needsEven(next.position) && d % 2)
      throw new RangeError(`position ${next.position} needs an even head dim (sin/cos pairs); got d = ${d}`);
    next.slope = "slope" in patch ? checkNumber("slope", patch.slope, 0, MAX_SLOPE) : cur.slope;
    next.offset = "offset" in patch ? checkOffset(patch.offset) : cur.offset;
    next.focus = "focus" in patch ? checkIndexOrNull("focus", patch.focus, n)
      : cur.focus !== null && cur.focus < n ? cur.focus : null;
    return next;
  }

  function initialState(initial) {
    const init = initial ?? {};
    const seed = init.seed ?? 0;
    if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) throw new RangeError(`seed must be an integer in [0, 2**32); got ${shown(seed)}`);
    const d = init.head_dim ?? (Array.isArray(init.q) && Array.isArray(init.q[0]) ? init.q[0].length : 4);
    if (!Number.isInteger(d) || d < MIN_DIM || d > MAX_DIM) throw new RangeError(`head_dim must be an integer in [${MIN_DIM}, ${MAX_DIM}]; got ${shown(d)}`);
    const tokens = checkTokens(init.tokens ?? WORDS.slice(0, 6));
    const n = tokens.length;
    const base = {
      tokens, q: resize([], n, d, "q", seed), k: resize([], n, d, "k", seed), v: resize([], n, d, "v", seed),
      scale: 1 / Math.sqrt(d), temperature: 1, causal: true, window: null, focus: n - 1,
      padding: new Array(n).fill(false), position: "none", slope: 0.5, offset: 0,
    };
    const patch = {};
    for (const key of STATE_KEYS) if (key in init && key !== "tokens") patch[key] = init[key];
    return { seed, state: merge(base, patch, seed) };
  }

  // -- drawing helpers ----------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function sci(x) {  // 1.2e3, 3.6e−15: no "+", a real minus sign
    const [mantissa, exponent] = x.toExponential(1).split("e");
    return `${mantissa.replace("-", MINUS)}e${exponent.replace("+", "").replace("-", MINUS)}`;
  }

  function fmt(x, digits = 2) {
    if (Math.abs(x) >= 1000) return sci(x);
    const t = x.toFixed(Math.abs(x) >= 100 ? 0 : digits);
    return Number(t) === 0 ? t.replace("-", "") : t.replace("-", MINUS);
  }

  function small(x) {  // a difference that may be rounding noise: 3.6e−15, or 5.20 (never 5.2e+0)
    return x === 0 || Math.abs(x) >= 0.01 ? fmt(x) : sci(x);
  }

  function shortNumber(x) {  // for number fields: two decimals on the slider grid, else up to four
    const r = Math.round(x * 1e4) / 1e4;
    return Math.round(x * 100) / 100 === x ? x.toFixed(2) : String(r);
  }

  const BLUE = [[255, 255, 255], [191, 219, 254], [96, 165, 250], [37, 99, 235], [30, 58, 138]];
  const NEG = [234, 88, 12], POS = [13, 148, 136];

  function ramp(stops, t) {
    const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    return stops[i].map((a, c) => Math.round(a + (stops[i + 1][c] - a) * f));
  }

  function rgb(c) { return `rgb(${c[0]}, ${c[1]}, ${c[2]})`; }

  function diverging(t) {  // t in [-1, 1]: orange for negative, teal for positive
    const end = t < 0 ? NEG : POS, a = Math.min(1, Math.abs(t));
    return end.map((e) => Math.round(255 + (e - 255) * a));
  }

  function ink(c) {  // dark or light text for a background
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 150 ? "#fff" : "#111827";
  }

  // -- the page's parts; `ui` collects the elements that updates touch ------------------
  function buildHeader() {
    const formula = el("p", { class: "akl-formula" },
      el("span", { text: "out = softmax(scale\u00b7QK\u1d40 / T + mask)\u00b7V" }));
    return el("header", { class: "akl-head" },
      el("h1", {}, el("span", { class: "akl-brand", text: "attnkit" }), el("span", { text: " attention lab" })),
      formula,
      el("p", { class: "akl-lead", text: "Drag any slider: scores, weights, entropy and outputs follow. "
        + "Click a query token to follow its attention. Masked pairs are hatched; a row with no allowed key outputs 0." }));
  }

  function buildControls(ui) {
    ui.scale = el("input", { type: "range", min: "0", max: "2", step: "0.001", "data-akl": "scale", "aria-label": "scale" });
    ui.scaleNum = el("input", { type: "number", step: "0.01", "data-akl": "scale-num", "aria-label": "scale value" });
    ui.sqrtD = el("button", { type: "button", class: "akl-small", "data-akl": "sqrt-d" });
    ui.temperature = el("input", { type: "range", min: "0.05", max: "5", step: "0.05", "data-akl": "temperature", "aria-label": "temperature" });
    ui.temperatureNum = el("input", { type: "number", min: String(MIN_T), max: String(MAX_T), step: "0.05", "data-akl": "temperature-num", "aria-label": "temperature value" });
    ui.causal = el("input", { type: "checkbox", "data-akl": "causal" });
    ui.window = el("input", { type: "range", min: "0", step: "1", "data-akl": "window", "aria-label": "sliding window" });
    ui.windowText = el("output", { class: "akl-readout", "data-akl": "window-text" });
    ui.headDim = el("input", { type: "number", min: String(MIN_DIM), max: String(MAX_DIM), step: "1", "data-akl": "head-dim", "aria-label": "head dim" });
    ui.position = el("select", { "data-akl": "position", "aria-label": "positions" },
      ...POSITIONS.KINDS.map((kind) => el("option", { value: kind, text: kind === "rope" ? "RoPE" : kind === "alibi" ? "ALiBi" : kind })));
    ui.slope = el("input", { type: "range", min: "0", max: "2", step: "0.01", "data-akl": "slope", "aria-label": "ALiBi slope" });
    ui.slopeText = el("output", { class: "akl-readout akl-short", "data-akl": "slope-text" });
    ui.offset = el("input", { type: "range", min: "0", max: "1000", step: "1", "data-akl": "offset", "aria-label": "position offset" });
    ui.offsetText = el("output", { class: "akl-readout akl-short", "data-akl": "offset-text" });
    ui.positionNote = el("p", { class: "akl-position-note", "data-akl": "position-note" });
    const control = (name, hint, ...inputs) => el("div", { class: "akl-control" },
      el("span", { class: "akl-control-name", text: name }), el("div", { class: "akl-control-inputs" }, ...inputs),
      hint ? el("span", { class: "akl-hint", text: hint }) : null);
    return el("section", { class: "akl-controls" },
      control("scale", "", ui.scale, ui.scaleNum, ui.sqrtD),
      control("temperature T", "", ui.temperature, ui.temperatureNum),
      control("mask", "", el("label", { class: "akl-check" }, ui.causal, el("span", { text: "causal" }))),
      control("sliding window w", "", ui.window, ui.windowText),
      control("head dim d", "", ui.headDim),
      control("positions", "", ui.position),
      control("ALiBi slope", "", ui.slope, ui.slopeText),
      control("offset: token 0 at", "", ui.offset, ui.offsetText),
      el("div", { class: "akl-control akl-end" },
        el("button", { type: "button", class: "akl-button", "data-akl": "reset", text: "Reset" })),
      ui.positionNote);
  }

  // what the vectors are: the labels are names only; `from` says where the labels came from, if not the default
  function vectorsNote(seed, from) {
    const what = `the vectors are random draws (seed ${seed}), not a trained model's, so what the words mean plays no part. `
      + "attnkit explain shows a real model's attention.";
    return typeof from === "string" && from ? `These tokens (${from}) are only labels: ${what}`
      : `The tokens are only labels: ${what}`;
  }

  function buildEditor(ui, note) {
    ui.editorBody = el("tbody");
    ui.add = el("button", { type: "button", class: "akl-button", "data-akl": "add", text: "+ Add token" });
    const headRow = el("tr", {}, el("th", { text: "" }), el("th", { text: "token" }));
    for (const r of ROLES) headRow.append(el("th", { class: `akl-role akl-role-${r}` }, el("b", { text: r }), el("span", { text: ` ${ROLE_NAMES[r]}` })));
    return el("section", { class: "akl-panel akl-editor" },
      el("h2", { text: "Tokens and their vectors" }),
      el("p", { class: "akl-vectors-note", "data-akl": "vectors-note", text: note }),
      el("table", { class: "akl-vectors" }, el("thead", {}, headRow), ui.editorBody),
      el("div", { class: "akl-editor-foot" }, ui.add,
        el("span", { class: "akl-hint", text: `${MIN_TOKENS} to ${MAX_TOKENS} tokens; "pad" masks a key out for every query.` })));
  }

  function buildView(ui) {  // the flow from queries to keys, then the matrices
    ui.summary = el("p", { class: "akl-summary", "data-akl": "summary" });
    ui.queries = el("div", { class: "akl-chips akl-queries" });
    ui.flow = el("canvas", { class: "akl-flow", "data-akl": "flow", height: "150" });
    ui.keys = el("div", { class: "akl-chips akl-keys" });
    ui.scores = el("table", { class: "akl-matrix", "data-akl": "scores" });
    ui.probs = el("table", { class: "akl-matrix", "data-akl": "probs" });
    ui.out = el("table", { class: "akl-matrix", "data-akl": "out" });
    ui.bias = el("table", { class: "akl-matrix", "data-akl": "bias" });
    ui.pe = el("table", { class: "akl-matrix", "data-akl": "pe" });
    ui.qRot = el("table", { class: "akl-matrix", "data-akl": "q-rotated" });
    ui.kRot = el("table", { class: "akl-matrix", "data-akl": "k-rotated" });
    const box = (title, formulaText, table) => el("div", { class: "akl-box" },
      el("h3", {}, el("span", { text: title }), el("code", { text: formulaText })), table);
    return el("section", { class: "akl-panel akl-view" },
      el("h2", { text: "Where each query looks" }),
      ui.summary,
      ui.flowWrap = el("div", { class: "akl-flow-wrap" },
        el("div", { class: "akl-axis akl-axis-q", text: "queries" }), ui.queries,
        ui.flow,
        el("div", { class: "akl-axis akl-axis-k", text: "keys" }), ui.keys),
      el("div", { class: "akl-matrices" },
        ui.peBox = box("sinusoidal positions", "PE(p): sin, cos pairs added to q and k", ui.pe),
        ui.qRotBox = box("RoPE: rotated queries", "q\u2032 = R(p)\u00b7q", ui.qRot),
        ui.kRotBox = box("RoPE: rotated keys", "k\u2032 = R(p)\u00b7k", ui.kRot),
        box("scores", "s = scale\u00b7q\u00b7k / T (+ bias)", ui.scores),
        ui.biasBox = box("ALiBi penalty", "bias = \u2212slope\u00b7|i \u2212 j|", ui.bias),
        box("weights and entropy", "p = softmax(s)", ui.probs),
        box("outputs", "o = p\u00b7V", ui.out)));
  }

  // -- the lab --------------------------------------------------------------------------
  function mount(root, initial) {
    if (!(root instanceof Element)) throw new TypeError(`AttnkitLab.mount needs a DOM element; got ${shown(root)}`);
    const { seed, state: start } = initialState(initial);
    let state = start;
    let shape = "";  // "n,d" of the last built structure
    const ui = {};

    // a fresh container, so that mounting again on the same element drops the old lab's listeners
    const lab = el("div", { class: "akl-root" });
    root.replaceChildren(lab);

    lab.append(buildHeader(), buildControls(ui));
    lab.append(el("div", { class: "akl-main" }, buildEditor(ui, vectorsNote(seed, initial?.tokens_from)), buildView(ui)));

    // panels from the other lab_*.js files, which register before this one runs
    const kit = { el, fmt, small, rgb, ramp, diverging, ink, BLUE, MINUS, shown, initial };
    const panels = (window.AttnkitLabPanels ?? []).map((make) => make(kit)).filter((panel) => panel !== null);
    for (const panel of panels) lab.append(panel.node);

    // -- structure (rebuilt when n or d changes) and values (every update) --------------
    function buildStructure() {
      const n = state.tokens.length, d = state.q[0].length;
      shape = `${n},${d}`;
      ui.editorBody.replaceChildren();
      ui.vec = { q: [], k: [], v: [] };
      ui.labels = []; ui.pads = []; ui.removes = []; ui.rowTags = [];
      for (let i = 0; i < n; i++) {
        const tag = el("button", { type: "button", class: "akl-index", "data-akl": "row", "data-i": String(i), title: "focus this query", text: String(i) });
        const label = el("input", { type: "text", class: "akl-label", maxlength: String(MAX_LABEL), "data-akl": "label", "data-i": String(i), "aria-label": `token ${i} label` });
        const pad = el("input", { type: "checkbox", "data-akl": "pad", "data-i": String(i) });
        const remove = el("button", { type: "button", class: "akl-remove", "data-akl": "remove", "data-i": String(i), title: "remove this token", text: "\u2715" });
        const row = el("tr", { "data-i": String(i) }, el("td", {}, tag),
          el("td", { class: "akl-token-cell" }, label,
            el("div", { class: "akl-token-tools" }, el("label", { class: "akl-check akl-pad" }, pad, el("span", { text: "pad" })), remove)));
        for (const r of ROLES) {
          const cell = el("td", { class: `akl-vec akl-role-${r}` });
          ui.vec[r].push([]);
          for (let c = 0; c < d; c++) {
            const slider = el("input", { type: "range", min: String(-SLIDER), max: String(SLIDER), step: "0.01", "data-akl": "vec", "data-role": r, "data-i": String(i), "data-c": String(c), "aria-label": `${r}[${i}][${c}]` });
            const num = el("input", { type: "number", step: "0.01", "data-akl": "vec-num", "data-role": r, "data-i": String(i), "data-c": String(c), "aria-label": `${r}[${i}][${c}] value` });
            cell.append(el("div", { class: "akl-vec-line" }, slider, num));
            ui.vec[r][i].push([slider, num]);
          }
          row.append(cell);
        }
        ui.editorBody.append(row);
        ui.labels.push(label); ui.pads.push(pad); ui.removes.push(remove); ui.rowTags.push(row);
      }
      ui.queries.replaceChildren(); ui.keys.replaceChildren();
      ui.queryChips = []; ui.keyChips = [];
      for (let i = 0; i < n; i++) {
        const q = el("button", { type: "button", class: "akl-chip", "data-akl": "query", "data-i": String(i) });
        const k = el("div", { class: "akl-chip akl-key", "data-akl": "key", "data-j": String(i) },
          el("span", { class: "akl-chip-label" }), el("span", { class: "akl-weight" }), el("span", { class: "akl-bar" }, el("i")));
        ui.queries.append(q); ui.keys.append(k);
        ui.queryChips.push(q); ui.keyChips.push(k);
      }
      for (const chips of [ui.queries, ui.keys]) chips.style.gridTemplateColumns = `repeat(${n}, minmax(0, 1fr))`;
      ui.flowWrap.classList.toggle("akl-many", n > MANY);  // narrower chips: the axis names go above them
      ui.window.max = String(n);
    }

    function setValue(input, value, source) {
      if (input !== source && input.value !== value) input.value = value;
    }

    function syncControls(source) {
      const d = state.q[0].length, n = state.tokens.length;
      setValue(ui.scale, String(state.scale), source);
      setValue(ui.scaleNum, shortNumber(state.scale), source);
      ui.sqrtD.textContent = `1/\u221a${d} = ${fmt(1 / Math.sqrt(d), 3)}`;
      ui.sqrtD.classList.toggle("akl-on", Math.abs(state.scale - 1 / Math.sqrt(d)) < 1e-12);
      setValue(ui.temperature, String(state.temperature), source);
      setValue(ui.temperatureNum, shortNumber(state.temperature), source);
      ui.causal.checked = state.causal;
      setValue(ui.window, String(state.window === null ? n : state.window), source);
      ui.windowText.textContent = state.window === null ? "off"
        : state.causal ? `${state.window} (0 \u2264 i\u2212j \u2264 ${state.window})` : `${state.window} (|i\u2212j| \u2264 ${state.window})`;
      setValue(ui.headDim, String(d), source);
      setValue(ui.position, state.position, source);
      for (const option of ui.position.options) option.disabled = POSITIONS.needsEven(option.value) && d % 2 === 1;
      setValue(ui.slope, String(state.slope), source);
      ui.slopeText.textContent = fmt(state.slope);
      ui.slope.disabled = state.position !== "alibi";
      setValue(ui.offset, String(Math.min(state.offset, 1000)), source);
      ui.offsetText.textContent = String(state.offset);
      for (let i = 0; i < n; i++) {
        setValue(ui.labels[i], state.tokens[i], source);
        ui.pads[i].checked = state.padding[i];
        ui.removes[i].disabled = n <= MIN_TOKENS;
        ui.rowTags[i].classList.toggle("akl-focus", state.focus === i);
        ui.rowTags[i].classList.toggle("akl-padded", state.padding[i]);
        for (const r of ROLES) for (let c = 0; c < d; c++) {
          const [slider, num] = ui.vec[r][i][c];
          setValue(slider, String(state[r][i][c]), source);
          setValue(num, shortNumber(state[r][i][c]), source);
        }
      }
      ui.add.disabled = n >= MAX_TOKENS;
    }

    function headerRow(columns) {
      const tr = el("tr", {}, el("th", { class: "akl-corner", text: "q \\ k" }));
      for (const c of columns) tr.append(el("th", { title: c, text: c }));
      return tr;
    }

    function rowHeader(i) {
      return el("th", { class: "akl-rowhead", "data-akl": "row", "data-i": String(i), title: state.tokens[i], text: state.tokens[i] });
    }

    function fillMatrices(res) {
      const n = state.tokens.length, d = state.q[0].length;
      let maxScore = 0, maxOut = 0;
      for (const row of res.scores) for (const s of row) if (s !== null) maxScore = Math.max(maxScore, Math.abs(s));
      for (const row of res.out) for (const o of row) maxOut = Math.max(maxOut, Math.abs(o));

      const scores = [el("thead", {}, headerRow(state.tokens))], probs = [el("thead", {}, headerRow([...state.tokens, "H bits"]))];
      const outHead = el("tr", {}, el("th", { class: "akl-corner", text: "query" }));
      for (let c = 0; c < d; c++) outHead.append(el("th", { text: `o${c}` }));
      const out = [el("thead", {}, outHead)];
      const sBody = el("tbody"), pBody = el("tbody"), oBody = el("tbody");
      for (let i = 0; i < n; i++) {
        const focus = state.focus === i ? "akl-focus" : "";
        const sRow = el("tr", { class: focus }, rowHeader(i)), pRow = el("tr", { class: focus }, rowHeader(i)), oRow = el("tr", { class: focus }, rowHeader(i));
        for (let j = 0; j < n; j++) {
          const s = res.scores[i][j];
          if (s === null) {
            sRow.append(el("td", { class: "akl-masked", title: "masked", text: MINUS + "\u221e" }));
            pRow.append(el("td", { class: "akl-masked", title: "masked", text: "" }));
            continue;
          }
          const sc = diverging(maxScore ? s / maxScore : 0), pc = ramp(BLUE, res.probs[i][j]);
          sRow.append(el("td", { style: `background:${rgb(sc)};color:${ink(sc)}`, title: String(s), text: fmt(s) }));
          pRow.append(el("td", { style: `background:${rgb(pc)};color:${ink(pc)}`, title: String(res.probs[i][j]), text: fmt(res.probs[i][j]) }));
        }
        const h = res.entropy[i], hMax = res.entropyMax[i];
        pRow.append(el("td", { class: "akl-entropy", title: `${h} of at most ${hMax} bits` },
          el("span", { text: `${fmt(h)} / ${fmt(hMax)}` }),
          el("span", { class: "akl-bar" }, el("i", { style: `width:${hMax > 0 ? (100 * h) / hMax : 0}%` }))));
        for (let c = 0; c < d; c++) {
          const o = res.out[i][c], oc = diverging(maxOut ? o / maxOut : 0);
          oRow.append(el("td", { style: `background:${rgb(oc)};color:${ink(oc)}`, title: String(o), text: fmt(o) }));
        }
        sBody.append(sRow); pBody.append(pRow); oBody.append(oRow);
      }
      ui.scores.replaceChildren(...scores, sBody);
      ui.probs.replaceChildren(...probs, pBody);
      ui.out.replaceChildren(...out, oBody);
    }

    function fillPositions(res) {
      const n = state.tokens.length;
      ui.biasBox.hidden = res.bias === null;
      if (res.bias !== null) {
        const body = el("tbody");
        for (let i = 0; i < n; i++) {
          const tr = el("tr", {}, rowHeader(i));
          for (let j = 0; j < n; j++) {
            const b = res.bias[i][j], c = diverging(state.slope > 0 ? b / (state.slope * (n - 1)) : 0);
            tr.append(el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(b), text: fmt(b) }));
          }
          body.append(tr);
        }
        ui.bias.replaceChildren(el("thead", {}, headerRow(state.tokens)), body);
      }
      ui.peBox.hidden = res.pe === null;
      if (res.pe !== null) ui.pe.replaceChildren(...vectorTable(res.pe, "PE", null));
      const rope = state.position === "rope";
      ui.qRotBox.hidden = ui.kRotBox.hidden = !rope;
      if (rope) {
        ui.qRot.replaceChildren(...vectorTable(res.q, "q\u2032", state.q));
        ui.kRot.replaceChildren(...vectorTable(res.k, "k\u2032", state.k));
      }
      ui.positionNote.textContent = positionNote(res);
    }

    // n x d vectors, one row per token with its position p; a cell's title gives its value before (if any)
    function vectorTable(m, name, before) {
      const d = m[0].length, top = Math.max(...m.flat().map(Math.abs), 1e-12);
      const head = el("tr", {}, el("th", { class: "akl-corner", text: "token" }), el("th", { text: "p" }),
        ...Array.from({ length: d }, (_, c) => el("th", { text: `${name}${c}` })));
      const body = el("tbody", {}, ...m.map((row, i) => el("tr", {}, rowHeader(i),
        el("td", { class: "akl-position", text: String(state.offset + i) }),
        ...row.map((x, c) => {
          const colour = diverging(x / top);
          return el("td", { style: `background:${rgb(colour)};color:${ink(colour)}`, title: before ? `${x} (before: ${before[i][c]})` : String(x), text: fmt(x) });
        }))));
      return [el("thead", {}, head), body];
    }

    function positionNote(res) {
      if (state.position === "none") return "No positions: permuting the tokens permutes the scores; "
        + "only the causal mask and the window know about order.";
      if (state.position === "alibi") return `ALiBi: every score gets −${fmt(state.slope)}·|i − j| `
        + "(its table follows the scores below), a penalty growing linearly with distance; q and k are not changed.";
      const home = compute({ ...state, offset: 0 });
      let shift = 0;
      for (let i = 0; i < res.scores.length; i++) for (let j = 0; j < res.scores.length; j++)
        if (res.scores[i][j] !== null) shift = Math.max(shift, Math.abs(res.scores[i][j] - home.scores[i][j]));
      const moved = `Moving every token by ${state.offset} changes the scores by at most ${small(shift)}`;
      if (state.position === "rope") return "RoPE rotates q and k by their positions (the rotated q\u2032 and k\u2032 "
        + "are shown below, before the scores), so a score depends only on the "
        + `distance i − j between the two tokens. ${moved}: nothing, to rounding. Drag the offset to see.`;
      return "Sinusoidal: PE(position), shown below before the scores, is added to q and k, so a score depends on where "
        + `the tokens are, not only on their distance. ${moved}.`;
    }

    function fillFlow(res) {
      const n = state.tokens.length, f = state.focus;
      for (let i = 0; i < n; i++) {
        const q = ui.queryChips[i];
        q.textContent = state.tokens[i];
        q.title = state.tokens[i];
        q.classList.toggle("akl-focus", f === i);
        const k = ui.keyChips[i];
        const [label, weight, bar] = k.children;
        label.textContent = state.tokens[i];
        k.title = state.tokens[i];
        const masked = f !== null && res.scores[f][i] === null;
        k.classList.toggle("akl-masked", masked);
        k.classList.toggle("akl-padded", state.padding[i]);
        weight.textContent = f === null ? "" : masked ? "masked" : fmt(res.probs[f][i]);
        bar.firstChild.style.width = `${f === null || masked ? 0 : 100 * res.probs[f][i]}%`;
      }
      if (f === null) {
        ui.summary.textContent = "All queries are drawn faintly. Click a query token to follow one.";
      } else if (res.entropyMax[f] === 0 && res.probs[f].every((p) => p === 0)) {
        ui.summary.textContent = `\u201c${state.tokens[f]}\u201d has no allowed key: its weights and its output are 0.`;
      } else {
        ui.summary.textContent = summaryOf(res, f);
      }
      drawFlow(res);
    }

    // a row whose largest weight is under EVEN times the even share 1/N has no key that stands out
    function summaryOf(res, f) {
      const allowed = res.scores[f].filter((s) => s !== null).length, top = Math.max(...res.probs[f]);
      const who = `\u201c${state.tokens[f]}\u201d (query ${f})`, entropy = `entropy ${fmt(res.entropy[f])} of at most ${fmt(res.entropyMax[f])} bits`;
      if (allowed > 1 && top < EVEN / allowed) {
        return `${who} spreads its attention almost evenly over its ${allowed} allowed keys: no key stands out `
          + `(the largest weight, ${fmt(top)}, is under ${EVEN}\u00d7 the even share 1/${allowed}); ${entropy}.`;
      }
      const best = res.probs[f].indexOf(top);
      return `${who} looks most at \u201c${state.tokens[best]}\u201d (${fmt(top)}); ${entropy}.`;
    }

    // the chips' labels shrink (to at least MIN_CHIP_FONT px) until the longest fits on one line
    const ruler = document.createElement("canvas").getContext("2d");
    function fitChips() {
      const labels = [...ui.queryChips, ...ui.keyChips.map((k) => k.firstChild)];
      for (const label of labels) label.style.fontSize = "";
      const style = getComputedStyle(labels[0]), size = parseFloat(style.fontSize);
      ruler.font = `${style.fontWeight} ${size}px ${style.fontFamily}`;
      const room = ui.keyChips[0].clientWidth - 6;  // the chip's padding and border
      const widest = Math.max(...labels.map((label) => ruler.measureText(label.textContent).width));
      if (widest > room) for (const label of labels) label.style.fontSize = `${Math.max(MIN_CHIP_FONT, (size * room) / widest)}px`;
    }

    function drawFlow(res) {
      const canvas = ui.flow, width = canvas.clientWidth, height = canvas.clientHeight;
      if (!width || !height) return;  // hidden (a tab not shown): the ResizeObserver redraws later
      fitChips();
      const dpr = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(width * dpr)) canvas.width = Math.round(width * dpr);
      if (canvas.height !== Math.round(height * dpr)) canvas.height = Math.round(height * dpr);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const n = state.tokens.length, f = state.focus, top = 4, bottom = height - 4;
      const left = canvas.getBoundingClientRect().left;
      const centre = (chip) => { const r = chip.getBoundingClientRect(); return r.left + r.width / 2 - left; };
      const qx = ui.queryChips.map(centre), kx = ui.keyChips.map(centre);
      const curve = (i, j) => {
        ctx.beginPath();
        ctx.moveTo(qx[i], top);
        ctx.bezierCurveTo(qx[i], height * 0.55, kx[j], height * 0.45, kx[j], bottom);
      };
      ctx.lineCap = "round";
      for (let i = 0; i < n; i++) {
        if (f !== null && i !== f) continue;
        for (let j = 0; j < n; j++) {
          const p = res.probs[i][j];
          if (f !== null && res.scores[i][j] === null) {
            curve(i, j);
            ctx.setLineDash([3, 4]);
            ctx.strokeStyle = "rgba(148, 163, 184, 0.55)";
            ctx.lineWidth = 1;
            ctx.stroke();
            ctx.setLineDash([]);
            continue;
          }
          if (p <= 0) continue;
          curve(i, j);
          ctx.strokeStyle = f === null ? `rgba(37, 99, 235, ${0.06 + 0.5 * p})` : `rgba(37, 99, 235, ${0.18 + 0.82 * p})`;
          ctx.lineWidth = f === null ? 0.75 + 5 * p : 1 + 18 * p;
          ctx.stroke();
        }
      }
      ctx.fillStyle = "#1e3a8a";
      for (let i = 0; i < n; i++) {
        ctx.beginPath(); ctx.arc(qx[i], top, 3, 0, 2 * Math.PI); ctx.fill();
        ctx.beginPath(); ctx.arc(kx[i], bottom, 3, 0, 2 * Math.PI); ctx.fill();
      }
    }

    function render(source = null) {
      if (shape !== `${state.tokens.length},${state.q[0].length}`) buildStructure();
      syncControls(source);
      const res = compute(state);
      fillMatrices(res);
      fillPositions(res);
      fillFlow(res);
      for (const panel of panels) panel.update(state, res);
    }

    function apply(patch, source = null) {
      state = merge(state, patch, seed);
      render(source);
    }

    // -- what the controls do ---------------------------------------------------------
    const numberOf = (input) => (input.value.trim() === "" ? NaN : Number(input.value));
    const copy = (m) => m.map((row) => row.slice());

    function setHeadDim(d) {
      const old = state.q[0].length, n = state.tokens.length;
      const patch = {};
      for (const r of ROLES) patch[r] = resize(state[r], n, d, r, seed);
      if (Math.abs(state.scale - 1 / Math.sqrt(old)) < 1e-12) patch.scale = 1 / Math.sqrt(d);
      return patch;
    }

    function removeToken(i) {
      const keep = (a) => a.filter((_, j) => j !== i);
      const f = state.focus;
      return {
        tokens: keep(state.tokens), q: keep(state.q), k: keep(state.k), v: keep(state.v), padding: keep(state.padding),
        focus: f === null || f === i ? null : f > i ? f - 1 : f,
        window: state.window === null ? null : Math.min(state.window, state.tokens.length - 2),
      };
    }

    lab.addEventListener("input", (event) => {
      const t = event.target, kind = t.dataset ? t.dataset.akl : undefined;
      const value = numberOf(t), i = Number(t.dataset.i);
      const n = state.tokens.length;
      if ((kind === "scale" || kind === "scale-num") && Number.isFinite(value) && Math.abs(value) <= MAX_ABS) apply({ scale: value }, t);
      else if ((kind === "temperature" || kind === "temperature-num") && value >= MIN_T && value <= MAX_T) apply({ temperature: value }, t);
      else if (kind === "causal") apply({ causal: t.checked }, t);
      else if (kind === "window" && Number.isInteger(value)) apply({ window: value >= n ? null : value }, t);
      else if (kind === "head-dim" && Number.isInteger(value) && value >= MIN_DIM && value <= MAX_DIM
        && !(POSITIONS.needsEven(state.position) && value % 2)) apply(setHeadDim(value), t);
      else if (kind === "position" && POSITIONS.KINDS.includes(t.value)) apply({ position: t.value }, t);
      else if (kind === "slope" && value >= 0 && value <= MAX_SLOPE) apply({ slope: value }, t);
      else if (kind === "offset" && Number.isInteger(value) && value >= 0 && value <= MAX_OFFSET) apply({ offset: value }, t);
      else if (kind === "label") apply({ tokens: state.tokens.map((s, j) => (j === i ? t.value : s)) }, t);
      else if (kind === "pad") apply({ padding: state.padding.map((p, j) => (j === i ? t.checked : p)) }, t);
      else if ((kind === "vec" || kind === "vec-num") && Number.isFinite(value) && Math.abs(value) <= MAX_ABS) {
        const m = copy(state[t.dataset.role]);
        m[i][Number(t.dataset.c)] = value;
        apply({ [t.dataset.role]: m }, t);
      }
    });
    // a number field being typed in is left alone until it is committed; then it shows the state
    lab.addEventListener("change", () => syncControls(null));

    lab.addEventListener("click", (event) => {
      const t = event.target.closest("[data-akl]");
      if (!t || !lab.contains(t)) return;
      const kind = t.dataset.akl, i = Number(t.dataset.i);
      if (kind === "query" || kind === "row") apply({ focus: state.focus === i ? null : i });
      else if (kind === "remove" && state.tokens.length > MIN_TOKENS) apply(removeToken(i));
      else if (kind === "add" && state.tokens.length < MAX_TOKENS) {
        const n = state.tokens.length;
        apply({ tokens: [...state.tokens, labelFor(n)] });
      } else if (kind === "sqrt-d") apply({ scale: 1 / Math.sqrt(state.q[0].length) });
      else if (kind === "reset") apply(start);
    });

    if (typeof ResizeObserver === "function") new ResizeObserver(() => drawFlow(compute(state))).observe(ui.flow);
    render();

    const api = {
      state: () => JSON.parse(JSON.stringify(state)),
      set: (partial) => { apply(partial); return api.state(); },
      result: () => compute(state),
      panels: Object.fromEntries(panels.map((panel) => [panel.name, panel.api])),
    };
    window.attnkitLab = api;
    return api;
  }

  window.AttnkitLab = { mount, compute, LIMITS: { minTokens: MIN_TOKENS, maxTokens: MAX_TOKENS, maxLabel: MAX_LABEL } };

  const host = document.getElementById("attnkit-lab");
  if (host) {
    const data = document.getElementById("attnkit-data");
    mount(host, data ? JSON.parse(data.textContent) : null);
  }
})();
