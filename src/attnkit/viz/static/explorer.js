/* attnkit explorer: head view, model view, matrix heatmap and head-role table for one
 * input's attention maps: self-attention, or cross-attention (data.key_tokens: queries on
 * the left of the head view and down the matrix, keys on the right and across). No libraries, no network: the maps arrive as the compact
 * encoding of attnkit/viz/encode.py. Text reaches the page through textContent or
 * canvas fillText only. Mount with AttnkitExplorer.mount(element, payload). */
(function () {
  "use strict";

  const ROLE_INFO = {
    previous_token: "share of attention on the previous token",
    duplicate_token: "share on earlier copies of the same token",
    induction: "share on the token after an earlier copy (A B ... A -> B)",
    first_token: "share on the first token (often a resting place)",
    mean_distance: "mean |query - key| distance, in tokens",
    normalized_entropy: "row entropy / log(keys seen): 0 = one key, 1 = uniform",
  };

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(c);
    return node;
  }

  // Twelve categorical colours that stay apart from each other and from the grey of weak
  // lines (Tableau's 10 plus two), then hues spread evenly for models with more heads.
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#edc948",
                   "#76b7b2", "#ff4fa7", "#9c6b4e", "#1f3d7a", "#8cd17d", "#6f2da8"];
  function headColor(h, n) {
    if (n <= PALETTE.length) return PALETTE[h];
    const hue = (h * 360 / n) % 360;
    return `hsl(${hue.toFixed(0)}, 70%, ${h % 2 ? 38 : 50}%)`;
  }

  // Light yellow -> orange -> deep purple, indexed by sqrt(value) so small weights show.
  const STOPS = [[255, 255, 255], [254, 232, 200], [253, 187, 132], [227, 74, 51], [179, 0, 90], [73, 0, 106]];
  function heat(v) {
    const x = Math.sqrt(Math.min(Math.max(v, 0), 1)) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
  }
  const heatCss = (v) => { const c = heat(v); return `rgb(${c[0] | 0},${c[1] | 0},${c[2] | 0})`; };

  function fmt(v) { return v >= 0.0995 ? v.toFixed(3) : v >= 0.001 ? v.toFixed(4) : v > 0 ? v.toExponential(1) : "0"; }
  function short(tok, n) { return tok.length > n ? tok.slice(0, n - 1) + "…" : tok; }

  /* ---------- the compact maps ---------- */

  async function decode(enc) {
    const text = atob(enc.blob);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    const buf = await new Response(stream).arrayBuffer();
    const M = enc.matrices, Lq = enc.n_q, Lk = enc.n_k, R = M * Lq, nb = enc.blocks;
    const counts = new Uint16Array(buf, 0, R);
    const ptr = new Uint32Array(R + 1);
    for (let r = 0; r < R; r++) ptr[r + 1] = ptr[r] + counts[r];
    const N = ptr[R];
    const expected = 2 * (R + 2 * N + R * nb);
    if (buf.byteLength !== expected) throw new Error(`the maps hold ${buf.byteLength} bytes, expected ${expected}`);
    const gaps = new Uint16Array(buf, 2 * R, N);
    const raw = new Uint16Array(buf, 2 * (R + N), N);
    const cols = new Uint16Array(N), vals = new Float32Array(N);
    for (let r = 0; r < R; r++) {
      let c = 0;
      for (let e = ptr[r]; e < ptr[r + 1]; e++) { c = e === ptr[r] ? gaps[e] : c + gaps[e]; cols[e] = c; }
    }
    for (let e = 0; e < N; e++) vals[e] = raw[e] * enc.quantum;
    const bg = nb ? new Uint16Array(buf, 2 * (R + 2 * N), R * nb) : null;
    return { M, Lq, Lk, ptr, cols, vals, bg, blocks: nb, block: enc.block, quantum: enc.quantum,
      free: new Int32Array(nb), level: new Float64Array(nb) };
  }

  /* Add w * row i of matrix m (peaks, plus the background spread over each block's
   * keys that are not peaks) into out (length Lk). */
  function addRow(sp, m, i, out, w) {
    const r = m * sp.Lq + i, a = sp.ptr[r], b = sp.ptr[r + 1];
    if (sp.blocks) {
      const B = sp.block, nb = sp.blocks, free = sp.free, level = sp.level, base = r * nb;
      for (let k = 0; k < nb; k++) free[k] = Math.min(B, sp.Lk - k * B);
      for (let e = a; e < b; e++) free[(sp.cols[e] / B) | 0]--;
      for (let k = 0; k < nb; k++) {
        const v = free[k] > 0 ? sp.bg[base + k] * sp.quantum / free[k] : 0;
        level[k] = v;
        if (v === 0) continue;
        const end = Math.min(sp.Lk, (k + 1) * B), vw = v * w;
        for (let j = k * B; j < end; j++) out[j] += vw;
      }
      for (let e = a; e < b; e++) { const c = sp.cols[e]; out[c] += (sp.vals[e] - level[(c / B) | 0]) * w; }
    } else {
      for (let e = a; e < b; e++) out[sp.cols[e]] += sp.vals[e] * w;
    }
  }

  /* Mean over matrices ``mats`` of row ``i`` into ``out`` (length Lk). */
  function aggregateRow(sp, mats, i, out) {
    out.fill(0);
    const w = 1 / mats.length;
    for (const m of mats) addRow(sp, m, i, out, w);
    return out;
  }

  /* ---------- the explorer ---------- */

  function mount(root, data) {
    root.textContent = "";
    root.classList.add("akx-root");
    const status = el("div", { class: "akx-status", text: "decoding the attention maps…" });
    root.appendChild(status);
    const api = { ready: null };
    api.ready = decode(data.encoding).then((sp) => { status.remove(); build(root, data, sp, api); return api; });
    api.ready.catch((err) => {
      root.textContent = "";
      root.appendChild(el("div", { class: "akx-status", text: "could not show the maps: " + err.message }));
      console.error(err);
    });
    return api;
  }

  function build(root, data, sp, api) {
    const L = data.layers.length, H = data.heads.length, tokens = data.tokens;
    const cross = !!data.key_tokens, keyTokens = data.key_tokens || tokens;
    const Lq = sp.Lq, Lk = sp.Lk;
    const hasRollout = !!data.rollout;
    const state = {
      // Open on the view the caller chose (explain --token: the head that looks hardest from
      // that token), else on every head of the last layer.
      layer: data.view ? data.view.layer : L - 1,
      heads: new Set(data.view ? data.view.heads : data.heads.map((_, i) => i)), mode: "heads",
      threshold: 0.02, focus: data.focus == null ? null : data.focus, hover: null, win: 0, tab: "head",
      detail: [0, 0],
    };
    const WIN = Math.min(Lq, 48), DET = Math.min(Math.max(Lq, Lk), 64);
    const rowBuf = new Float32Array(Lk);

    function mats() {
      if (state.mode === "rollout") return [L * H + state.layer];
      return [...state.heads].sort((a, b) => a - b).map((h) => state.layer * H + h);
    }
    function label() {
      const lay = `layer ${data.layers[state.layer]}`;
      if (state.mode === "rollout") return `rollout up to ${lay}`;
      const hs = [...state.heads].sort((a, b) => a - b).map((h) => data.heads[h]);
      if (hs.length === 1) return `${lay}, head ${hs[0]}`;
      const run = hs.length > 3 && hs[hs.length - 1] - hs[0] === hs.length - 1; // consecutive heads
      return `${lay}, mean of heads ${run ? `${hs[0]}–${hs[hs.length - 1]}` : hs.join(", ")}`;
    }

    /* header */
    const enc = data.encoding;
    root.appendChild(el("div", { class: "akx-head" }, [
      el("div", { class: "akx-title", text: data.title || "attention" }),
      el("div", { class: "akx-sub", text: `${data.model || "model"} · ${cross ? `${Lq} queries × ${Lk} keys` : `${Lq} tokens`} · ${L} layers × ${H} heads` }),
    ]));

    /* why the page opened where it did (explain --token, serve) */
    const why = data.view_reason ? el("p", { class: "akx-why", "data-role": "why", text: data.view_reason }) : null;
    if (why) root.appendChild(why);

    /* controls */
    const layerSel = el("select", { "data-control": "layer", "aria-label": "layer" });
    data.layers.forEach((l, i) => layerSel.appendChild(el("option", { value: String(i), text: `layer ${l}` })));
    layerSel.value = String(state.layer);
    layerSel.addEventListener("change", () => { state.layer = +layerSel.value; redraw(); });

    const modeSel = el("select", { "data-control": "mode", "aria-label": "aggregation" });
    modeSel.appendChild(el("option", { value: "heads", text: "selected heads (mean)" }));
    const rollOpt = el("option", { value: "rollout", text: "rollout (layers 0…this)" });
    if (!hasRollout) { rollOpt.disabled = true; rollOpt.title = data.rollout_missing || "not available"; }
    modeSel.appendChild(rollOpt);
    modeSel.addEventListener("change", () => { state.mode = modeSel.value; redraw(); });

    const chips = el("div", { class: "akx-chips" });
    const chipEls = data.heads.map((h, i) => {
      const c = el("button", { class: "akx-chip", "data-head": String(h), title: `head ${h}`, text: String(h) });
      c.style.setProperty("--c", headColor(i, H));
      c.addEventListener("click", (ev) => {
        if (ev.shiftKey || ev.metaKey || ev.ctrlKey) { state.heads = new Set([i]); }
        else if (state.heads.has(i)) { if (state.heads.size > 1) state.heads.delete(i); }
        else state.heads.add(i);
        state.mode = "heads"; redraw();
      });
      chips.appendChild(c);
      return c;
    });
    const allBtn = el("button", { class: "akx-btn", text: "all", onclick: () => { state.heads = new Set(data.heads.map((_, i) => i)); state.mode = "heads"; redraw(); } });

    const thr = el("input", { type: "range", min: "0", max: "0.5", step: "0.005", value: String(state.threshold), "data-control": "threshold", "aria-label": "threshold" });
    const thrOut = el("span", { class: "akx-num" });
    thr.addEventListener("input", () => { state.threshold = +thr.value; redraw(); });

    const find = el("input", { type: "search", placeholder: "find token…", "data-control": "find", "aria-label": "find token" });
    find.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter") return;
      const want = find.value.trim().toLowerCase();
      if (!want) { setFocus(null); return; }
      const start = state.focus == null ? 0 : state.focus + 1;
      for (let n = 0; n < Lq; n++) {
        const i = (start + n) % Lq;
        if (tokens[i].toLowerCase().replace(/^(##|ġ|▁)/, "") === want || tokens[i].toLowerCase() === want) { setFocus(i); return; }
      }
      find.classList.add("akx-miss"); setTimeout(() => find.classList.remove("akx-miss"), 600);
    });

    root.appendChild(el("div", { class: "akx-controls" }, [
      el("label", {}, [el("span", { text: "Layer" }), layerSel]),
      el("label", {}, [el("span", { text: "Aggregate" }), modeSel]),
      el("div", { class: "akx-heads" }, [el("span", { text: "Heads" }), chips, allBtn,
        el("span", { class: "akx-hint", text: "click: toggle · shift-click: only" })]),
      el("label", {}, [el("span", { text: "Threshold" }), thr, thrOut]),
      find,
    ]));

    /* tabs */
    const tabs = el("div", { class: "akx-tabs", role: "tablist" });
    const panes = {};
    const TABS = [["head", "Head view"], ["model", "Model view"], ["matrix", cross ? "Alignment" : "Matrix"], ["roles", "Head roles"]];
    for (const [id, name] of TABS) {
      tabs.appendChild(el("button", { class: "akx-tab", "data-tab": id, role: "tab", text: name, onclick: () => { state.tab = id; redraw(); } }));
      panes[id] = el("div", { class: "akx-pane", "data-pane": id });
    }
    root.appendChild(tabs);
    const body = el("div", { class: "akx-body" });
    const main = el("div", { class: "akx-main" }, Object.values(panes));
    const info = el("div", { class: "akx-info" });
    body.appendChild(main); body.appendChild(info);
    root.appendChild(body);

    /* encoding note: say what the file leaves out */
    root.appendChild(el("p", { class: "akx-note", "data-role": "encoding", text: encodingNote(enc) }));
    /* what attention costs in this model at this length (report_cost.js, when the report has it) */
    if (data.cost && window.AttnkitCost) root.appendChild(window.AttnkitCost.section(data.cost));

    /* ---------- head view ---------- */
    const hv = el("canvas", { class: "akx-canvas", "data-view": "head" });
    const winCtl = el("input", { type: "range", min: "0", max: String(Math.max(Lq - WIN, 0)), step: "1", value: "0", "data-control": "window", "aria-label": "window" });
    const winLbl = el("span", { class: "akx-num" });
    winCtl.addEventListener("input", () => { state.win = +winCtl.value; redraw(); });
    panes.head.appendChild(el("div", { class: "akx-row" }, Lq > WIN ? [el("span", { text: "Tokens" }), winCtl, winLbl] : []));
    panes.head.appendChild(hv);
    const hvLegend = el("div", { class: "akx-hlegend", "data-role": "head-legend" });
    panes.head.appendChild(hvLegend);
    const ROW = 20, LX = 200, RX = 560, W_HV = 760;
    // The key side's window: the query window's, kept inside the keys (they may be fewer or more).
    const keyStart = () => Math.max(0, Math.min(state.win, Lk - WIN));

    function hvTokenAt(ev) {
      const r = hv.getBoundingClientRect();
      const x = ev.clientX - r.left, y = ev.clientY - r.top;
      const i = Math.floor((y - 10) / ROW), k0 = keyStart();
      if (i < 0) return null;
      if (x < LX + 10 && i < Math.min(WIN, Lq - state.win)) return { side: "q", i: state.win + i };
      if (x > RX - 10 && i < Math.min(WIN, Lk - k0)) return { side: "k", i: k0 + i };
      return null;
    }
    hv.addEventListener("mousemove", (ev) => { const t = hvTokenAt(ev); if (JSON.stringify(t) !== JSON.stringify(state.hover)) { state.hover = t; drawHead(); showInfo(); } });
    hv.addEventListener("mouseleave", () => { state.hover = null; drawHead(); showInfo(); });
    hv.addEventListener("click", (ev) => { const t = hvTokenAt(ev); if (t && t.side === "q") setFocus(state.focus === t.i ? null : t.i); });
    hv.addEventListener("wheel", (ev) => {
      if (Lq <= WIN) return;
      ev.preventDefault();
      state.win = Math.max(0, Math.min(Lq - WIN, state.win + Math.sign(ev.deltaY) * 4)); redraw();
    }, { passive: false });

    function drawHead() {
      const k0 = keyStart(), n = Math.min(WIN, Lq - state.win), nk = Math.min(WIN, Lk - k0);
      const h = Math.max(n, nk) * ROW + 20;
      const ctx = sized(hv, W_HV, h);
      ctx.clearRect(0, 0, W_HV, h);
      const w0 = state.win, focusQ = state.hover && state.hover.side === "q" ? state.hover.i : state.focus;
      const focusK = state.hover && state.hover.side === "k" ? state.hover.i : null;
      const list = mats();
      ctx.lineCap = "round";
      for (const m of list) {
        const head = m < L * H ? m % H : null;
        ctx.strokeStyle = head == null ? "#5b3cc4" : headColor(head, H);
        ctx.lineWidth = list.length > 1 ? 1.6 : 2.4;
        for (let i = w0; i < w0 + n; i++) {
          if (focusQ != null && i !== focusQ) continue;
          const r = m * Lq + i;
          for (let e = sp.ptr[r]; e < sp.ptr[r + 1]; e++) {
            const j = sp.cols[e], v = sp.vals[e];
            if (j < k0 || j >= k0 + nk || v < state.threshold) continue;
            if (focusK != null && j !== focusK) continue;
            ctx.globalAlpha = Math.min(1, v * (list.length > 1 ? 1 : 1.2));
            ctx.beginPath();
            ctx.moveTo(LX + 8, 10 + (i - w0 + 0.5) * ROW);
            ctx.bezierCurveTo((LX + RX) / 2, 10 + (i - w0 + 0.5) * ROW, (LX + RX) / 2, 10 + (j - k0 + 0.5) * ROW, RX - 8, 10 + (j - k0 + 0.5) * ROW);
            ctx.stroke();
          }
        }
      }
      ctx.globalAlpha = 1;
      ctx.font = "13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
      ctx.textBaseline = "middle";
      // The key side: shade each key by the weight the focused query (or hovered) gives it.
      let weights = null;
      if (focusQ != null) weights = aggregateRow(sp, list, focusQ, rowBuf);
      for (let i = 0; i < n; i++) {
        const q = w0 + i, y = 10 + (i + 0.5) * ROW;
        ctx.textAlign = "right";
        if (q === focusQ) { ctx.fillStyle = "#ffe08a"; ctx.fillRect(LX - 150, y - ROW / 2 + 1, 158, ROW - 2); }
        ctx.fillStyle = q === focusQ ? "#000" : "#333";
        ctx.fillText(short(tokens[q], 18), LX, y);
        ctx.fillStyle = "#999"; ctx.textAlign = "left"; ctx.font = "10px sans-serif";
        ctx.fillText(String(q), 4, y);
        ctx.font = "13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
      }
      for (let i = 0; i < nk; i++) {
        const kj = k0 + i, y = 10 + (i + 0.5) * ROW;
        if (weights) { ctx.fillStyle = heatCss(weights[kj]); ctx.fillRect(RX - 4, y - ROW / 2 + 1, 160, ROW - 2); }
        if (kj === focusK) { ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.strokeRect(RX - 4, y - ROW / 2 + 1, 160, ROW - 2); }
        ctx.textAlign = "left";
        ctx.fillStyle = weights && weights[kj] > 0.35 ? "#fff" : "#333";
        ctx.fillText(short(keyTokens[kj], 18), RX, y);
      }
      winLbl.textContent = `${w0}–${w0 + n - 1} of ${Lq}`;
      drawHeadLegend(list);
    }
    /* Which colour is which head (several heads: one colour each; rollout: one colour), and what opacity means. */
    function drawHeadLegend(list) {
      hvLegend.textContent = "";
      const key = (colour, text) => el("span", { class: "akx-hkey" }, [el("span", { class: "akx-swatch", style: `background:${colour}` }), el("span", { text })]);
      if (state.mode === "rollout") hvLegend.appendChild(key("#5b3cc4", `rollout up to layer ${data.layers[state.layer]}`));
      else for (const m of list) hvLegend.appendChild(key(headColor(m % H, H), `head ${data.heads[m % H]}`));
      const many = list.length > 1 ? "each selected head draws its own lines in its colour (the info panel and matrix show their mean); " : "";
      hvLegend.appendChild(el("span", { class: "akx-hint", text: `${many}a line's opacity is its weight; weights below the threshold are not drawn.` }));
    }

    /* ---------- model view ---------- */
    const grid = el("div", { class: "akx-grid" });
    panes.model.appendChild(el("p", { class: "akx-hint", text: "Each thumbnail is one head's whole pattern (queries down, keys across; the largest value in each pixel's block for long inputs). Click one to open it in the matrix view." }));
    panes.model.appendChild(grid);
    let gridBuilt = false;
    const pending = [];
    function buildGrid() {
      if (gridBuilt) return;
      gridBuilt = true;
      // Thumbnails are drawn a few at a time, so a long input's page stays responsive.
      const work = () => {
        const t = performance.now();
        while (pending.length && performance.now() - t < 40) thumb(...pending.shift());
        if (pending.length) setTimeout(work, 0); else grid.dataset.done = "1";
      };
      setTimeout(work, 0);
      // Thumbnails sized to the pane's width, the rollout column included (scroll only past 24 px each).
      const cols = H + (hasRollout ? 1 : 0), avail = (panes.model.clientWidth || 900) - 40 - 4 * cols;
      const S = Math.max(24, Math.min(96, Math.floor(avail / cols)));
      grid.style.gridTemplateColumns = `auto repeat(${H + (hasRollout ? 1 : 0)}, ${S}px)`;
      grid.appendChild(el("div"));
      data.heads.forEach((h) => grid.appendChild(el("div", { class: "akx-gh", text: `H${h}` })));
      if (hasRollout) grid.appendChild(el("div", { class: "akx-gh", text: "rollout" }));
      for (let l = 0; l < L; l++) {
        grid.appendChild(el("div", { class: "akx-gh akx-gl", text: `L${data.layers[l]}` }));
        const cells = data.heads.map((_, h) => [l * H + h, h]);
        if (hasRollout) cells.push([L * H + l, null]);
        for (const [m, h] of cells) {
          const c = el("canvas", { class: "akx-thumb", "data-layer": String(data.layers[l]), "data-head": h == null ? "rollout" : String(data.heads[h]), title: h == null ? `rollout up to layer ${data.layers[l]}` : `layer ${data.layers[l]}, head ${data.heads[h]}` });
          pending.push([c, m, S]);
          c.addEventListener("click", () => {
            state.layer = l;
            if (h == null) state.mode = "rollout"; else { state.mode = "heads"; state.heads = new Set([h]); }
            state.tab = "matrix"; redraw();
          });
          grid.appendChild(c);
        }
      }
    }
    function thumb(c, m, S) {
      const ctx = sized(c, S, S, 1);
      const px = new Float32Array(S * S), fy = S / Lq, fx = S / Lk, row = new Float32Array(Lk);
      for (let i = 0; i < Lq; i++) {
        row.fill(0); addRow(sp, m, i, row, 1);
        const y0 = Math.floor(i * fy), y1 = Math.max(y0 + 1, Math.floor((i + 1) * fy));
        for (let j = 0; j < Lk; j++) {
          const v = row[j];
          if (v === 0) continue;
          const x0 = Math.floor(j * fx), x1 = Math.max(x0 + 1, Math.floor((j + 1) * fx));
          for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) if (v > px[y * S + x]) px[y * S + x] = v;
        }
      }
      const img = ctx.createImageData(S, S);
      for (let p = 0; p < S * S; p++) { const col = heat(px[p]); img.data.set([col[0], col[1], col[2], 255], 4 * p); }
      ctx.putImageData(img, 0, 0);
    }

    /* ---------- matrix view ---------- */
    const ov = el("canvas", { class: "akx-canvas akx-ov", "data-view": "overview" });
    const mx = el("canvas", { class: "akx-canvas", "data-view": "matrix" });
    const tip = el("div", { class: "akx-tip" });
    const mxTitle = el("div", { class: "akx-mtitle" });
    const legend = el("canvas", { class: "akx-legend" });
    panes.matrix.appendChild(mxTitle);
    const ovWrap = el("div", { class: "akx-ovwrap" }, [
      el("div", { class: "akx-hint", text: `Whole matrix (${Lq}×${Lk}); click to move the detail window` }), ov]);
    panes.matrix.appendChild(el("div", { class: "akx-mrow" }, Math.max(Lq, Lk) > DET ? [mx, ovWrap] : [mx]));
    panes.matrix.appendChild(legend);
    root.appendChild(tip);
    const LAB = 130, AXIS = 18;  // room for the token labels, and for the axis titles outside them
    const mxAxes = el("div", { class: "akx-hint", "data-role": "axes" });
    panes.matrix.insertBefore(mxAxes, panes.matrix.children[1]);
    let cell = 10;
    function matrixRows(r0, n) {
      const list = mats(), out = [];
      for (let i = r0; i < r0 + n; i++) out.push(Float32Array.from(aggregateRow(sp, list, i, rowBuf)));
      return out;
    }
    function drawMatrix() {
      mxTitle.textContent = label() + (state.threshold > 0 ? ` · values below ${state.threshold} hidden` : "");
      const [r0, c0] = state.detail, nr = Math.min(DET, Lq - r0), nc = Math.min(DET, Lk - c0);
      cell = Math.max(8, Math.min(40, Math.floor(680 / Math.max(nr, nc))));
      const labels = cell >= 9;
      const off = (labels ? LAB : 30) + AXIS;
      const ctx = sized(mx, off + nc * cell + 4, off + nr * cell + 4);
      ctx.clearRect(0, 0, mx.width, mx.height);
      const rows = matrixRows(r0, nr);
      for (let i = 0; i < nr; i++) for (let j = 0; j < nc; j++) {
        const v = rows[i][c0 + j];
        ctx.fillStyle = v < state.threshold ? "#fff" : heatCss(v);
        ctx.fillRect(off + j * cell, off + i * cell, cell, cell);
      }
      if (state.focus != null && state.focus >= r0 && state.focus < r0 + nr) {
        ctx.strokeStyle = "#1a73e8"; ctx.lineWidth = 2;
        ctx.strokeRect(off - 1, off + (state.focus - r0) * cell, nc * cell + 2, cell);
      }
      ctx.strokeStyle = "#ccc"; ctx.lineWidth = 1; ctx.strokeRect(off - 0.5, off - 0.5, nc * cell + 1, nr * cell + 1);
      const font = Math.min(12, cell);
      ctx.fillStyle = "#333"; ctx.font = `${font}px ui-monospace, Menlo, Consolas, monospace`;
      ctx.textBaseline = "middle";
      const shown = [];
      if (labels) {
        // Every step-th label, so that neighbours never overlap: rows need a line each, and the
        // columns' labels, at 60 degrees, need font / sin(60) of width each.
        const rowStep = Math.ceil((font + 1) / cell), colStep = Math.ceil((font + 1) / Math.sin(Math.PI / 3) / cell);
        ctx.textAlign = "right";
        for (let i = 0; i < nr; i += rowStep) ctx.fillText(short(tokens[r0 + i], 16), off - 4, off + (i + 0.5) * cell);
        for (let j = 0; j < nc; j += colStep) {
          shown.push(c0 + j);
          ctx.save(); ctx.translate(off + (j + 0.5) * cell, off - 4); ctx.rotate(-Math.PI / 3);
          ctx.textAlign = "left"; ctx.fillText(short(keyTokens[c0 + j], 16), 0, 0); ctx.restore();
        }
        mx.dataset.labelStep = `${rowStep},${colStep}`;
      } else {
        ctx.textAlign = "left"; ctx.fillText(`rows ${r0}–${r0 + nr - 1}, keys ${c0}–${c0 + nc - 1}`, AXIS + 4, AXIS + 14);
      }
      mx.dataset.columnLabels = JSON.stringify(shown);
      // The axes' titles: queries down the rows, keys across the columns.
      ctx.fillStyle = "#1f2328"; ctx.font = "600 12px system-ui, sans-serif"; ctx.textBaseline = "top";
      ctx.textAlign = "left"; ctx.fillText(`${cross ? "source " : ""}key →`, off, 2);
      ctx.textAlign = "right"; ctx.textBaseline = "bottom"; ctx.fillText(`${cross ? "target " : ""}query ↓`, off - 6, off - 6);
      mxAxes.textContent = `rows: ${cross ? "target tokens (queries)" : "queries"} ↓ · columns: ${cross ? "source tokens (keys)" : "keys"} →`;
      mx.dataset.origin = String(off);
      mx.dataset.cell = String(cell);
      if (Math.max(Lq, Lk) > DET) drawOverview();
      drawLegend();
    }
    function drawOverview() {
      const S = 320, ctx = sized(ov, S, S, 1);
      const list = mats(), px = new Float32Array(S * S), fy = S / Lq, fx = S / Lk;
      for (let i = 0; i < Lq; i++) {
        const row = aggregateRow(sp, list, i, rowBuf), y = Math.min(S - 1, Math.floor(i * fy));
        for (let j = 0; j < Lk; j++) { const v = row[j]; const p = y * S + Math.min(S - 1, Math.floor(j * fx)); if (v > px[p]) px[p] = v; }
      }
      const img = ctx.createImageData(S, S);
      for (let p = 0; p < S * S; p++) { const v = px[p] < state.threshold ? 0 : px[p]; const col = heat(v); img.data.set([col[0], col[1], col[2], 255], 4 * p); }
      ctx.putImageData(img, 0, 0);
      const [r0, c0] = state.detail;
      ctx.strokeStyle = "#1a73e8"; ctx.lineWidth = 2;
      ctx.strokeRect(c0 * fx, r0 * fy, Math.min(DET, Lk) * fx, Math.min(DET, Lq) * fy);
    }
    function drawLegend() {
      const ctx = sized(legend, 260, 34);
      for (let x = 0; x < 200; x++) { ctx.fillStyle = heatCss(x / 199); ctx.fillRect(30 + x, 4, 1, 12); }
      ctx.fillStyle = "#555"; ctx.font = "11px sans-serif"; ctx.textBaseline = "top"; ctx.textAlign = "center";
      for (const v of [0, 0.1, 0.25, 0.5, 1]) ctx.fillText(String(v), 30 + Math.sqrt(v) * 199, 19);
    }
    ov.addEventListener("click", (ev) => {
      const r = ov.getBoundingClientRect(), S = r.width;
      const i = Math.floor((ev.clientY - r.top) / S * Lq), j = Math.floor((ev.clientX - r.left) / S * Lk);
      state.detail = [clampStart(i, Lq), clampStart(j, Lk)]; redraw();
    });
    function clampStart(i, n) { return Math.max(0, Math.min(n - Math.min(DET, n), i - (DET >> 1))); }
    mx.addEventListener("mousemove", (ev) => {
      const r = mx.getBoundingClientRect(), off = +mx.dataset.origin;
      const j = Math.floor((ev.clientX - r.left - off) / cell), i = Math.floor((ev.clientY - r.top - off) / cell);
      const [r0, c0] = state.detail;
      if (i < 0 || j < 0 || i >= Math.min(DET, Lq - r0) || j >= Math.min(DET, Lk - c0)) { tip.style.display = "none"; return; }
      const q = r0 + i, k = c0 + j, v = aggregateRow(sp, mats(), q, rowBuf)[k];
      tip.textContent = `#${q} ${tokens[q]} → #${k} ${keyTokens[k]}\n${fmt(v)}  (${label()})`;
      tip.style.display = "block";
      tip.style.left = `${ev.clientX + 14}px`; tip.style.top = `${ev.clientY + 14}px`;
    });
    mx.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    mx.addEventListener("click", (ev) => {
      const r = mx.getBoundingClientRect(), off = +mx.dataset.origin;
      const i = Math.floor((ev.clientY - r.top - off) / cell);
      if (i >= 0 && i < Math.min(DET, Lq - state.detail[0])) setFocus(state.detail[0] + i, true);
    });

    /* ---------- head roles ---------- */
    const roles = data.roles || { names: [], scores: {}, skipped: {} };
    const tops = el("div", { class: "akx-tops" });
    const table = el("table", { class: "akx-table" });
    panes.roles.appendChild(tops);
    panes.roles.appendChild(table);
    let sortBy = roles.names[0] || null, sortDesc = true;
    function buildRoles() {
      tops.textContent = "";
      for (const role of roles.names) {
        const flat = [];
        roles.scores[role].forEach((row, l) => row.forEach((s, h) => { if (s != null) flat.push([s, l, h]); }));
        const best = flat.sort((a, b) => (role === "mean_distance" || role === "normalized_entropy" ? a[0] - b[0] : b[0] - a[0])).slice(0, 3);
        const card = el("div", { class: "akx-card", "data-role-card": role }, [el("div", { class: "akx-cardt", text: role.replace(/_/g, " ") }),
          el("div", { class: "akx-hint", text: ROLE_INFO[role] || "" })]);
        const evidence = (roles.evidence || {})[role];
        if (evidence) card.appendChild(el("div", { class: "akx-hint", "data-role": "evidence", text: `scored on ${evidence}` }));
        for (const [s, l, h] of best) {
          card.appendChild(el("button", { class: "akx-btn akx-pick", text: `L${data.layers[l]}.H${data.heads[h]}  ${s.toFixed(3)}`, onclick: () => pick(l, h) }));
        }
        tops.appendChild(card);
      }
      // A role left unscored (too little evidence, no token ids) gets a card beside the others, with the reason.
      for (const [role, why] of Object.entries(roles.skipped || {})) {
        tops.appendChild(el("div", { class: "akx-card", "data-role-card": role, "data-skipped": "1" }, [
          el("div", { class: "akx-cardt", text: role.replace(/_/g, " ") }),
          el("div", { class: "akx-hint", text: ROLE_INFO[role] || "" }),
          el("div", { class: "akx-hint", "data-role": "not-scored", text: `not scored: ${why}` })]));
      }
      table.textContent = "";
      const head = el("tr", {}, [el("th", { text: "layer" }), el("th", { text: "head" })]);
      for (const role of roles.names) {
        const th = el("th", { class: "akx-sort", title: ROLE_INFO[role] || "", text: role.replace(/_/g, " ") + (role === sortBy ? (sortDesc ? " ▼" : " ▲") : "") });
        th.addEventListener("click", () => { if (sortBy === role) sortDesc = !sortDesc; else { sortBy = role; sortDesc = true; } buildRoles(); });
        head.appendChild(th);
      }
      table.appendChild(el("thead", {}, [head]));
      const rows = [];
      for (let l = 0; l < L; l++) for (let h = 0; h < H; h++) rows.push([l, h]);
      if (sortBy) {
        const s = roles.scores[sortBy], v = (r) => (s[r[0]][r[1]] == null ? -Infinity : s[r[0]][r[1]]);
        rows.sort((a, b) => (sortDesc ? v(b) - v(a) : v(a) - v(b)));
      }
      const maxOf = {};
      for (const role of roles.names) maxOf[role] = Math.max(1e-12, ...roles.scores[role].flat().filter((x) => x != null));
      const tb = el("tbody");
      for (const [l, h] of rows) {
        const tr = el("tr", { "data-layer": String(data.layers[l]), "data-head": String(data.heads[h]) }, [el("td", { text: String(data.layers[l]) }), el("td", { text: String(data.heads[h]) })]);
        for (const role of roles.names) {
          const s = roles.scores[role][l][h];
          const td = el("td", { text: s == null ? "–" : s.toFixed(3) });
          if (s != null) td.style.background = `linear-gradient(90deg, rgba(227,74,51,.28) ${(100 * s / maxOf[role]).toFixed(1)}%, transparent 0)`;
          tr.appendChild(td);
        }
        tr.addEventListener("click", () => pick(l, h));
        tb.appendChild(tr);
      }
      table.appendChild(tb);
    }
    function pick(l, h) { state.layer = l; state.heads = new Set([h]); state.mode = "heads"; state.tab = "head"; redraw(); }

    /* ---------- info panel: the focused token's top keys ---------- */
    function showInfo() {
      info.textContent = "";
      const q = state.hover && state.hover.side === "q" ? state.hover.i : state.focus;
      info.appendChild(el("div", { class: "akx-cardt", text: label() }));
      if (q == null) {
        info.appendChild(el("p", { class: "akx-hint", text: "Hover over a token on the left (or click it to pin it) to see where it looks. Keys are on the right." }));
        return;
      }
      const row = aggregateRow(sp, mats(), q, rowBuf);
      const order = Array.from(row.keys()).filter((j) => row[j] > 0).sort((a, b) => row[b] - row[a]).slice(0, 10);
      info.appendChild(el("p", { class: "akx-focus" }, [el("span", { text: "query " }), el("b", { text: tokens[q] }), el("span", { text: ` #${q}` })]));
      const list = el("ol", { class: "akx-list" });
      for (const j of order) {
        const bar = el("span", { class: "akx-bar" });
        bar.style.width = `${(row[j] * 100).toFixed(1)}%`;
        list.appendChild(el("li", {}, [el("span", { class: "akx-tok", text: keyTokens[j] }), el("span", { class: "akx-idx", text: `#${j}` }), el("span", { class: "akx-val", text: fmt(row[j]) }), bar]));
      }
      info.appendChild(list);
      if (Lk > WIN) {
        let inside = 0; const k0 = keyStart();
        for (let j = k0; j < Math.min(Lk, k0 + WIN); j++) inside += row[j];
        info.appendChild(el("p", { class: "akx-hint", text: `${(100 * (1 - inside)).toFixed(1)}% of this row's weight goes to keys outside the head view's window.` }));
      }
    }

    function setFocus(i, keepTab) {
      state.focus = i;
      if (i != null) {
        if (i < state.win || i >= state.win + WIN) state.win = Math.max(0, Math.min(Math.max(Lq - WIN, 0), i - (WIN >> 1)));
        if (i < state.detail[0] || i >= state.detail[0] + DET) state.detail = [clampStart(i, Lq), clampStart(i, Lk)];
      }
      if (!keepTab && state.tab !== "matrix") state.tab = state.tab === "model" || state.tab === "roles" ? "head" : state.tab;
      redraw();
    }

    function redraw() {
      layerSel.value = String(state.layer);
      modeSel.value = state.mode;
      winCtl.value = String(state.win);
      thrOut.textContent = state.threshold.toFixed(3);
      chipEls.forEach((c, i) => c.classList.toggle("akx-on", state.mode === "heads" && state.heads.has(i)));
      for (const b of tabs.children) b.classList.toggle("akx-active", b.dataset.tab === state.tab);
      for (const [id, p] of Object.entries(panes)) p.style.display = id === state.tab ? "" : "none";
      if (state.tab === "head") drawHead();
      if (state.tab === "model") buildGrid();
      if (state.tab === "matrix") drawMatrix();
      if (state.tab === "roles" && !table.firstChild) buildRoles();
      showInfo();
      root.dataset.state = JSON.stringify(publicState());
    }

    function publicState() {
      return { layer: data.layers[state.layer], heads: [...state.heads].sort((a, b) => a - b).map((h) => data.heads[h]), mode: state.mode, threshold: state.threshold, focus: state.focus, window: state.win, tab: state.tab, detail: state.detail.slice() };
    }

    /* For tests and scripting: read the state, set it, and read decoded rows. */
    api.state = publicState;
    api.set = (s) => {
      // Check everything first, then change the state: a bad field leaves the page as it was.
      const index = (list, v, what) => {
        const i = list.indexOf(v);
        if (i < 0) throw new RangeError(`${what} must be one of ${list.join(", ")}; got ${v}`);
        return i;
      };
      const number = (v, what) => {
        if (typeof v !== "number" || !Number.isFinite(v)) throw new TypeError(`${what} must be a finite number; got ${v}`);
        return v;
      };
      const next = {};
      if (s.layer != null) next.layer = index(data.layers, s.layer, "layer");
      if (s.heads != null) {
        if (!Array.isArray(s.heads) || !s.heads.length) throw new RangeError("heads must be a non-empty array of head indices");
        next.heads = new Set(s.heads.map((h) => index(data.heads, h, "head")));
      }
      if (s.mode != null) {
        if (s.mode !== "heads" && s.mode !== "rollout") throw new RangeError(`mode must be "heads" or "rollout"; got ${s.mode}`);
        if (s.mode === "rollout" && !hasRollout) throw new RangeError("these maps have no rollout: " + data.rollout_missing);
        next.mode = s.mode;
      }
      if (s.threshold != null) next.threshold = Math.min(Math.max(number(s.threshold, "threshold"), 0), 1);
      if (s.tab != null) { index(TABS.map((t) => t[0]), s.tab, "tab"); next.tab = s.tab; }
      if (s.window != null) next.win = Math.max(0, Math.min(Math.max(Lq - WIN, 0), Math.floor(number(s.window, "window"))));
      if ("focus" in s && s.focus !== null && !(Number.isInteger(s.focus) && s.focus >= 0 && s.focus < Lq)) {
        throw new RangeError(`focus must be null or a token index in [0, ${Lq}); got ${s.focus}`);
      }
      Object.assign(state, next);
      if ("focus" in s) { setFocus(s.focus, true); return publicState(); }
      redraw(); return publicState();
    };
    api.row = (m, i) => { const out = new Float32Array(Lk); addRow(sp, m, i, out, 1); return Array.from(out); };
    api.aggregate = (i) => Array.from(aggregateRow(sp, mats(), i, new Float32Array(Lk)));
    api.matrices = sp.M;
    if (state.focus != null) setFocus(state.focus, true); // also moves the windows to it
    else redraw();
  }

  /* What the compact encoding leaves out, in words. */
  function encodingNote(enc) {
    const mean = (xs) => xs.reduce((a, b) => a + b, 0) / Math.max(xs.length, 1);
    const pct = (x, d) => `${(100 * x).toFixed(d)}%`;
    const kept = `${enc.kept.toLocaleString("en-US")} of ${enc.entries.toLocaleString("en-US")} entries stored exactly`;
    if (!enc.blocks) {
      return `Stored compactly: each attention row keeps its largest entries until at most ${pct(enc.tolerance, 1)} of ` +
        `its weight is left out (the most any row lost: ${pct(Math.max(...enc.dropped_max), 2)}; mean ` +
        `${pct(mean(enc.dropped_mean), 3)}); values rounded to 1/65535; ${kept}. Left-out entries show as 0.`;
    }
    return `Stored compactly: each attention row keeps its ${enc.peaks == null ? "" : enc.peaks + " "}largest entries (fewer where they hold all but ` +
      `${pct(enc.tolerance, 1)} of the row) exactly, to 1/65535; ${kept}. The rest of each row's weight is kept as ` +
      `sums over blocks of ${enc.block} keys, shown spread evenly over the block: no weight is lost, but those small ` +
      `values are blurred within their block, each off by at most ${Math.max(...enc.blurred_max).toFixed(4)} ` +
      `(the largest value that went into a block; ${mean(enc.blurred_mean).toFixed(5)} on average over rows).`;
  }

  function sized(canvas, w, h, ratio) {
    const r = ratio || window.devicePixelRatio || 1;
    canvas.width = Math.round(w * r); canvas.height = Math.round(h * r);
    canvas.style.width = `${w}px`; canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(r, 0, 0, r, 0, 0);
    return ctx;
  }

  // The pieces generation.js and seq2seq.js build on.
  window.AttnkitExplorer = { mount, decode, addRow, aggregateRow, el, heat, heatCss, headColor, fmt, short };
  const node = document.getElementById("attnkit-explorer");
  const dataNode = document.getElementById("attnkit-data");
  if (node && dataNode) window.attnkitExplorer = mount(node, JSON.parse(dataNode.textContent));
})();
