/* attnkit long-document explorer: a layers x heads grid of sink mass, entropy and mean distance; the mass each
 * token receives along the document for the selected head (a canvas strip, aggregated per pixel column); a text
 * view of a window of the document (a canvas: only the window is laid out); and a zoom on a span of queries: the
 * stored top-k keys per query (static page), or their exact weights computed by the server (attnkit serve --long).
 * Nothing is a DOM node per token. Text reaches the page through textContent and canvas fillText only. Mount with
 * AttnkitLong.mount(element, payload); built on explorer.js's pieces (el, heat, decode). */
(function () {
  "use strict";
  const X = window.AttnkitExplorer, el = X.el;
  const METRICS = [
    ["sink", (d) => `sink mass (first ${d.sink_tokens} tokens)`, "of each query's weight, on average"],
    ["entropy", () => "entropy (nats)", "mean over queries"],
    ["distance", () => "mean distance (tokens)", "weighted |query - key|, mean over queries"],
  ];
  const WINDOWS = [["whole", "the whole document"], ["64", "64 keys either side"], ["512", "512 keys either side"]];
  const num = (v) => (v == null ? "n/a" : Number(v.toPrecision(6)).toString());
  const brief = (v) => Number(v.toPrecision(4)).toString();  // a legend's ends: the readout has 6 digits
  const plain = (t) => t.replace(/\s+/g, " ");

  function sized(canvas, w, h) {
    const r = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * r); canvas.height = Math.round(h * r);
    canvas.style.width = `${w}px`; canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(r, 0, 0, r, 0, 0);
    return ctx;
  }

  function float32(b64) {
    const text = atob(b64), bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }

  function local(ev, canvas) {
    const r = canvas.getBoundingClientRect();
    return [ev.clientX - r.left, ev.clientY - r.top];
  }

  function mount(root, data) {
    const L = data.tokens.length, NL = data.layers.length, NH = data.heads.length;
    const received = float32(data.received.blob);
    const peak = new Float64Array(NL * NH);  // each head's largest received mass
    for (let m = 0; m < NL * NH; m++) {
      let best = 0;
      for (let j = 0; j < L; j++) best = Math.max(best, received[m * L + j]);
      peak[m] = best;
    }
    function inner() {  // the width the canvases fill: the root's, less its padding
      const style = getComputedStyle(root);
      return Math.max(300, Math.floor(root.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 2));
    }
    const api = { data, sel: { l: 0, h: 0 }, win: { start: 0, count: 0 }, span: null, zoomed: null, top: null };
    root.textContent = "";
    root.classList.add("akd");
    const cw = data.context_window;
    root.appendChild(el("div", { class: "akx-head" }, [
      el("div", { class: "akx-title", text: data.title || "a long document" }),
      el("div", { class: "akx-sub akd-facts", text: `${data.model} · ${L.toLocaleString("en")} tokens · ${NL} layers × ${NH} heads · ` +
        (cw == null ? "context window: the model states none (its positions set no limit)"
          : `context window: ${cw.toLocaleString("en")} positions (this document fills ${(100 * L / cw).toFixed(1)}%)`) }),
      el("div", { class: "akx-sub", text: `How to read it: in each grid a row is a layer (L0, L1, …) and a column a head; ` +
        "hover a cell for its values, click it to show that head in the strip and the text below. " +
        "Drag over the text to zoom on those queries: " + (data.zoom
          ? "their exact weights on this server, computed on request."
          : `this page stores each query's ${data.top.peaks} heaviest keys (weights to 1/65535), and the zoom sums up the rest; ` +
            "attnkit serve --long computes exact weights.") }),
    ]));

    /* ---------- overview grid ---------- */
    const grids = el("div", { class: "akd-grids" });
    const readout = el("div", { class: "akd-readout", role: "status", "aria-live": "polite" });
    root.appendChild(grids); root.appendChild(readout);
    const gridCanvases = {};
    for (const [name, label, note] of METRICS) {
      const values = data.grid[name].flat().filter((v) => v != null);
      const lo = Math.min(...values), hi = Math.max(...values);
      const canvas = el("canvas", { class: "akd-grid", "data-metric": name });
      gridCanvases[name] = { canvas, lo, hi };
      grids.appendChild(el("figure", { class: "akd-panel" }, [
        el("figcaption", { text: label(data) }), canvas,
        el("div", { class: "akd-note", text: `${note}; ${brief(lo)} (light) to ${brief(hi)} (dark)` }),
      ]));
      canvas.addEventListener("mousemove", (ev) => { const c = cellAt(ev, canvas); if (c) say(describeHead(c.l, c.h)); });
      canvas.addEventListener("click", (ev) => { const c = cellAt(ev, canvas); if (c) select(c.l, c.h); });
    }
    const CELL = Math.max(8, Math.min(26, Math.floor(300 / NH))), LEFT = 30, TOP = 16;
    const hist = data.distance_share ? el("canvas", { class: "akd-hist", "data-view": "distance" }) : null;
    const histCaption = el("figcaption");
    if (hist) {
      grids.appendChild(el("figure", { class: "akd-panel" }, [histCaption, hist,
        el("div", { class: "akd-note", text: "share of the weight at each distance |query - key| (bins double)" })]));
      hist.addEventListener("mousemove", (ev) => {
        const [x] = local(ev, hist), t = Math.floor((x - 4) / HIST_BAR), share = data.distance_share[api.sel.l][api.sel.h];
        if (t >= 0 && t < share.length) say(`distance ${binName(t)}: ${num(share[t])} of the weight (layer ${data.layers[api.sel.l]} head ${data.heads[api.sel.h]})`);
      });
    }
    const HIST_BAR = 14, HIST_H = 80;
    function binName(t) {
      const a = data.distance_edges[t], b = data.distance_edges[t + 1] - 1;
      return a === b ? String(a) : `${a}–${b}`;
    }

    function drawHist() {
      if (!hist) return;
      const share = data.distance_share[api.sel.l][api.sel.h];
      histCaption.textContent = `attention distance, layer ${data.layers[api.sel.l]} head ${data.heads[api.sel.h]}`;
      const ctx = sized(hist, 8 + share.length * HIST_BAR, HIST_H + 14);
      const most = Math.max(...share) || 1;
      ctx.font = "9px sans-serif"; ctx.textAlign = "center"; ctx.fillStyle = "#555";
      share.forEach((v, t) => {
        const h = v / most * (HIST_H - 2);
        ctx.fillStyle = X.heatCss(0.25 + 0.75 * v / most);
        ctx.fillRect(4 + t * HIST_BAR, HIST_H - h, HIST_BAR - 2, h);
        if (t % 3 === 0) { ctx.fillStyle = "#555"; ctx.fillText(String(data.distance_edges[t]), 4 + (t + 0.5) * HIST_BAR, HIST_H + 10); }
      });
    }

    function cellAt(ev, canvas) {
      const [x, y] = local(ev, canvas);
      const h = Math.floor((x - LEFT) / CELL), l = Math.floor((y - TOP) / CELL);
      return h >= 0 && h < NH && l >= 0 && l < NL ? { l, h } : null;
    }

    function describeHead(l, h) {
      const g = data.grid;
      const logit = g.max_logit ? ` · max logit ${num(g.max_logit[l][h])}` : "";
      return `layer ${data.layers[l]} head ${data.heads[h]} · sink mass ${num(g.sink[l][h])} · entropy ` +
        `${num(g.entropy[l][h])} nats · mean distance ${num(g.distance[l][h])} tokens${logit}`;
    }

    function drawGrids() {
      for (const [name] of METRICS) {
        const { canvas, lo, hi } = gridCanvases[name];
        const ctx = sized(canvas, LEFT + NH * CELL + 2, TOP + NL * CELL + 2);
        ctx.font = "10px sans-serif"; ctx.fillStyle = "#555"; ctx.textBaseline = "middle";
        for (let l = 0; l < NL; l++) ctx.fillText(`L${data.layers[l]}`, 2, TOP + (l + 0.5) * CELL);
        ctx.textAlign = "center";
        for (let h = 0; h < NH; h += Math.ceil(NH / 12)) ctx.fillText(String(data.heads[h]), LEFT + (h + 0.5) * CELL, TOP / 2);
        for (let l = 0; l < NL; l++) {
          for (let h = 0; h < NH; h++) {
            const v = data.grid[name][l][h];
            ctx.fillStyle = v == null ? "#ccc" : X.heatCss(hi > lo ? (v - lo) / (hi - lo) : 0.5);
            ctx.fillRect(LEFT + h * CELL, TOP + l * CELL, CELL - 1, CELL - 1);
          }
        }
        ctx.strokeStyle = "#1f6feb"; ctx.lineWidth = 2;
        ctx.strokeRect(LEFT + api.sel.h * CELL, TOP + api.sel.l * CELL, CELL - 1, CELL - 1);
      }
    }

    /* ---------- received mass along the document ---------- */
    const stripTitle = el("div", { class: "akd-label" });
    const strip = el("canvas", { class: "akd-strip", "data-view": "strip" });
    root.appendChild(el("section", { class: "akd-section" }, [stripTitle, strip]));
    const STRIP_H = 110;
    let stripW = 800;

    function head() { return api.sel.l * NH + api.sel.h; }

    function drawStrip() {
      stripW = inner();
      const ctx = sized(strip, stripW, STRIP_H);
      const m = head(), top = Math.log1p(peak[m]) || 1;
      stripTitle.textContent = `Mass each token receives from all queries, layer ${data.layers[api.sel.l]} head ` +
        `${data.heads[api.sel.h]} (largest: ${num(peak[m])}; bars: the largest in each pixel column, line: the mean; ` +
        "log scale). Click to move the text window.";
      ctx.fillStyle = "#fafafa"; ctx.fillRect(0, 0, stripW, STRIP_H);
      const ws = api.win.start * stripW / L, we = (api.win.start + api.win.count) * stripW / L;
      ctx.fillStyle = "rgba(31,111,235,0.12)"; ctx.fillRect(ws, 0, Math.max(2, we - ws), STRIP_H);
      ctx.beginPath();
      for (let px = 0; px < stripW; px++) {
        const a = Math.floor(px * L / stripW), b = Math.max(a + 1, Math.floor((px + 1) * L / stripW));
        let hi = 0, sum = 0;
        for (let j = a; j < b; j++) { const v = received[m * L + j]; hi = Math.max(hi, v); sum += v; }
        const bar = Math.log1p(hi) / top * (STRIP_H - 4);
        ctx.fillStyle = X.heatCss(Math.log1p(hi) / top);
        ctx.fillRect(px, STRIP_H - bar, 1, bar);
        const y = STRIP_H - Math.log1p(sum / (b - a)) / top * (STRIP_H - 4);
        if (px === 0) ctx.moveTo(px, y); else ctx.lineTo(px + 0.5, y);
      }
      ctx.strokeStyle = "#222"; ctx.lineWidth = 1; ctx.stroke();
      if (api.span) {
        ctx.fillStyle = "#1f6feb";
        ctx.fillRect(api.span.q0 * stripW / L, 0, Math.max(2, (api.span.q1 - api.span.q0) * stripW / L), 6);
      }
    }

    function tokenAtStrip(x) { return Math.min(L - 1, Math.max(0, Math.floor(x * L / stripW))); }

    strip.addEventListener("mousemove", (ev) => {
      const [x] = local(ev, strip);
      const a = tokenAtStrip(x), b = Math.max(a + 1, Math.floor((Math.floor(x) + 1) * L / stripW));
      let best = a;
      for (let j = a; j < Math.min(b, L); j++) if (received[head() * L + j] > received[head() * L + best]) best = j;
      say(describeToken(best, b - a > 1 ? `tokens ${a}–${b - 1}, the most at ` : ""));
    });
    strip.addEventListener("click", (ev) => { const [x] = local(ev, strip); moveWindow(tokenAtStrip(x) - (api.win.count >> 1)); });

    function describeToken(j, prefix) {
      return `${prefix || ""}token ${j} «${plain(data.tokens[j])}» receives ${num(received[head() * L + j])} ` +
        `(summed over the queries; layer ${data.layers[api.sel.l]} head ${data.heads[api.sel.h]})`;
    }

    /* ---------- the text window ---------- */
    const slider = el("input", { type: "range", min: "0", max: String(L - 1), value: "0", class: "akd-slider",
      "aria-label": "first token of the text window" });
    const winLabel = el("span", { class: "akd-note" });
    const text = el("canvas", { class: "akd-text", "data-view": "text" });
    const q0In = el("input", { type: "number", min: "0", max: String(L - 1), class: "akd-num", "aria-label": "first query" });
    const q1In = el("input", { type: "number", min: "1", max: String(L), class: "akd-num", "aria-label": "end query (exclusive)" });
    const go = el("button", { type: "button", class: "akd-go", text: "Zoom" });
    root.appendChild(el("section", { class: "akd-section" }, [
      el("div", { class: "akd-label", text: "The text, shaded by the mass each token receives. Drag over tokens to " +
        `zoom on them as queries (at most ${maxRows()}).` }),
      el("div", { class: "akd-controls" }, [slider, winLabel]), text,
      el("div", { class: "akd-controls" }, [el("span", { text: "Queries from " }), q0In, el("span", { text: " up to " }), q1In, go]),
    ]));
    const TEXT_H = 240, LINE = 20;
    let boxes = [];
    slider.addEventListener("input", () => moveWindow(Number(slider.value)));
    text.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const perLine = Math.max(1, Math.round(api.win.count / Math.max(1, Math.floor(TEXT_H / LINE))));
      moveWindow(api.win.start + Math.sign(ev.deltaY) * perLine * 3);
    }, { passive: false });

    function maxRows() { return data.zoom ? data.zoom.max_rows : 64; }

    function moveWindow(start) {
      api.win.start = Math.max(0, Math.min(L - 1, Math.round(start)));
      drawText(); drawStrip();
    }

    function drawText() {
      const w = inner();
      const ctx = sized(text, w, TEXT_H);
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, TEXT_H);
      ctx.font = "13px sans-serif"; ctx.textBaseline = "middle";
      const m = head(), top = Math.log1p(peak[m]) || 1;
      boxes = [];
      let x = 4, y = 4, j = api.win.start;
      while (j < L) {
        const label = plain(data.tokens[j]) || "·";
        const tw = Math.min(w - 8, ctx.measureText(label).width + 6);
        if (x + tw > w - 4) { x = 4; y += LINE; }
        if (y + LINE > TEXT_H) break;
        const inSpan = api.span && j >= api.span.q0 && j < api.span.q1;
        ctx.fillStyle = X.heatCss(Math.log1p(received[m * L + j]) / top);
        ctx.fillRect(x, y, tw, LINE - 3);
        if (inSpan) { ctx.strokeStyle = "#1f6feb"; ctx.lineWidth = 2; ctx.strokeRect(x + 1, y + 1, tw - 2, LINE - 5); }
        const c = X.heat(Math.log1p(received[m * L + j]) / top);
        ctx.fillStyle = c[0] * 0.3 + c[1] * 0.6 + c[2] * 0.1 < 110 ? "#fff" : "#111";
        ctx.fillText(label, x + 3, y + (LINE - 3) / 2, tw - 6);
        boxes.push([j, x, y, tw]);
        x += tw + 2; j++;
      }
      api.win.count = j - api.win.start;
      slider.value = String(api.win.start);
      winLabel.textContent = ` tokens ${api.win.start}–${j - 1} of ${L.toLocaleString("en")}`;
    }

    function tokenAtText(ev) {
      const [x, y] = local(ev, text);
      for (const [j, bx, by, bw] of boxes) if (x >= bx && x < bx + bw + 2 && y >= by && y < by + LINE) return j;
      return null;
    }
    let anchor = null;
    text.addEventListener("mousedown", (ev) => { anchor = tokenAtText(ev); if (anchor != null) setSpan(anchor, anchor + 1, false); });
    text.addEventListener("mousemove", (ev) => {
      const j = tokenAtText(ev);
      if (j == null) return;
      say(describeToken(j));
      if (anchor != null) setSpan(Math.min(anchor, j), Math.max(anchor, j) + 1, false);
    });
    window.addEventListener("mouseup", () => { if (anchor != null) { anchor = null; if (api.span) zoom(); } });
    go.addEventListener("click", () => {
      const a = Number(q0In.value), b = Number(q1In.value);
      if (!(Number.isInteger(a) && Number.isInteger(b) && a >= 0 && a < b && b <= L)) {
        showError(`Queries must satisfy 0 ≤ from < up to ≤ ${L}; got ${q0In.value} and ${q1In.value}.`);
        return;
      }
      setSpan(a, b, true); zoom();
    });

    function setSpan(a, b, move) {
      b = Math.min(b, a + maxRows());
      api.span = { q0: a, q1: b };
      q0In.value = String(a); q1In.value = String(b);
      if (move && (a < api.win.start || a >= api.win.start + api.win.count)) api.win.start = Math.max(0, a - 20);
      drawText(); drawStrip();
    }

    /* ---------- zoom ---------- */
    const zoomTitle = el("div", { class: "akd-label", text: "Select queries in the text to see where they attend." });
    const windowSel = el("select", { class: "akd-select", "aria-label": "keys shown" },
      WINDOWS.map(([v, t]) => el("option", { value: v, text: t })));
    windowSel.addEventListener("change", () => { if (api.span) zoom(); });
    const status = el("div", { class: "akd-status", role: "status" });
    const busy = el("progress", { class: "akd-busy", "aria-label": "computing the weights", hidden: "" });
    const error = el("div", { class: "akd-error", role: "alert", hidden: "" });
    const zc = el("canvas", { class: "akd-zoom", "data-view": "zoom" });
    const axis = el("div", { class: "akd-note" });
    const rowsList = el("ol", { class: "akd-rows" });
    root.appendChild(el("section", { class: "akd-section akd-zoompanel" }, [
      zoomTitle, el("div", { class: "akd-controls" }, [el("span", { text: "Keys: " }), windowSel, busy, status]),
      error, zc, axis, rowsList]));
    zc.addEventListener("mousemove", (ev) => {
      if (!api.zoomed) return;
      const z = api.zoomed, [x, y] = local(ev, zc);
      const r = Math.floor(y / z.rowH), key = z.k0 + Math.floor(x / z.width * (z.k1 - z.k0));
      if (r >= 0 && r < z.q1 - z.q0 && key >= z.k0 && key < z.k1) say(`query ${z.q0 + r} → key ${key} «${plain(data.tokens[key])}»`);
    });

    function showError(text) { error.textContent = text; error.hidden = false; }

    function keyRange() {
      const v = windowSel.value, s = api.span;
      if (v === "whole") return [0, L];
      const r = Number(v);
      return [Math.max(0, s.q0 - r), Math.min(L, s.q1 + r)];
    }

    let asked = 0;
    async function zoom() {
      const s = api.span, l = api.sel.l, h = api.sel.h, [k0, k1] = keyRange();
      const ticket = ++asked;
      error.hidden = true;
      zoomTitle.textContent = `Queries ${s.q0}–${s.q1 - 1} (${s.q1 - s.q0}) in layer ${data.layers[l]} head ${data.heads[h]}, ` +
        `over keys ${k0}–${k1 - 1}`;
      root.dataset.zoom = "busy";
      let z;
      if (data.zoom) {
        status.textContent = "computing the exact weights…";
        busy.hidden = false;
        const width = inner();
        try {
          const res = await fetch(data.zoom.url, { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ layer: data.layers[l], head: data.heads[h], q0: s.q0, q1: s.q1, k0, k1,
              columns: Math.min(data.zoom.max_columns, Math.floor(width)) }) });
          const answer = await res.json();
          if (!res.ok) throw new Error(answer.error || `the server answered ${res.status}`);
          if (ticket !== asked) return;
          z = fromServer(answer);
        } catch (e) {
          if (ticket !== asked) return;
          busy.hidden = true;
          status.textContent = ""; root.dataset.zoom = "error";
          showError(`The zoom failed: ${e.message}`);
          return;
        }
      } else {
        await api.ready;  // the stored top-k, decoded once
        z = fromTop(s.q0, s.q1, k0, k1, l * NH + h);
      }
      if (ticket !== asked) return;
      api.zoomed = z;
      busy.hidden = true;
      status.textContent = data.zoom ? "exact (computed by the server)" : `top ${data.top.peaks} keys per query, as stored`;
      drawZoom(z); listRows(z);
      root.dataset.zoom = "done";
    }

    function fromServer(a) {
      const R = a.q1 - a.q0, w = float32(a.weights), C = w.length / R;
      const rows = [];
      for (let r = 0; r < R; r++) rows.push({ q: a.q0 + r, top: a.top[r], rest: a.outside[r], cells: w.subarray(r * C, (r + 1) * C) });
      return { q0: a.q0, q1: a.q1, k0: a.k0, k1: a.k1, per: a.per, rows, exact: true };
    }

    function fromTop(q0, q1, k0, k1, m) {
      const rows = [], t = api.top;
      for (let q = q0; q < q1; q++) {
        const r = m * L + q, top = [];
        let sum = 0;
        for (let e = t.ptr[r]; e < t.ptr[r + 1]; e++) { top.push([t.cols[e], t.vals[e]]); sum += t.vals[e]; }
        top.sort((a, b) => b[1] - a[1]);
        rows.push({ q, top, rest: Math.max(0, 1 - sum), cells: null });
      }
      return { q0, q1, k0, k1, per: 1, rows, exact: false };
    }

    function drawZoom(z) {
      const width = inner(), R = z.q1 - z.q0;
      z.rowH = Math.max(4, Math.min(18, Math.floor(260 / R))); z.width = width;
      const ctx = sized(zc, width, R * z.rowH);
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, R * z.rowH);
      const span = z.k1 - z.k0;
      let most = 0;  // colours are relative to the heaviest cell shown, so that diffuse rows show too
      for (const row of z.rows) {
        if (row.cells) for (const v of row.cells) most = Math.max(most, v);
        else for (const [, w] of row.top) most = Math.max(most, w);
      }
      const shade = (v) => X.heatCss(most > 0 ? v / most : 0);
      z.rows.forEach((row, r) => {
        if (row.cells) {
          const C = row.cells.length, cw = width / C;
          for (let c = 0; c < C; c++) {
            if (row.cells[c] <= 0) continue;
            ctx.fillStyle = shade(row.cells[c]);
            ctx.fillRect(c * cw, r * z.rowH, Math.max(1, cw), z.rowH - 1);
          }
        } else {
          for (const [key, w] of row.top) {
            if (key < z.k0 || key >= z.k1) continue;
            ctx.fillStyle = shade(w);
            ctx.fillRect((key - z.k0) / span * width, r * z.rowH, Math.max(2, width / span), z.rowH - 1);
          }
        }
        const q = row.q;
        if (q >= z.k0 && q < z.k1) {  // where the query itself sits
          ctx.fillStyle = "#1f6feb";
          ctx.fillRect((q - z.k0) / span * width, r * z.rowH, 1, z.rowH - 1);
        }
      });
      axis.textContent = `rows: queries ${z.q0}–${z.q1 - 1}; across: keys ${z.k0}–${z.k1 - 1}` +
        (z.per > 1 ? `, ${z.per} keys summed per column` : "") + `; darkest = ${X.fmt(most)}, the heaviest shown; ` +
        "the blue tick marks each query's own position.";
    }

    function listRows(z) {
      rowsList.textContent = "";
      for (const row of z.rows) {
        const li = el("li", { class: "akd-row", "data-query": String(row.q) }, [
          el("span", { class: "akd-q", text: `${row.q} «${X.short(plain(data.tokens[row.q]), 16)}»` })]);
        for (const [key, w] of row.top) {
          li.appendChild(el("span", { class: "akd-key", "data-key": String(key), "data-weight": String(w),
            text: `${key} «${X.short(plain(data.tokens[key]), 14)}» ${X.fmt(w)}` }));
        }
        const restLabel = z.exact ? (z.k0 === 0 && z.k1 === L ? null : "outside these keys") : "other keys";
        if (restLabel) li.appendChild(el("span", { class: "akd-rest", "data-rest": String(row.rest), text: `${restLabel}: ${X.fmt(row.rest)}` }));
        rowsList.appendChild(li);
      }
    }

    /* ---------- selection and drawing ---------- */
    function say(text) { readout.textContent = text; }

    function select(l, h) {
      api.sel = { l, h };
      root.dataset.layer = String(data.layers[l]); root.dataset.head = String(data.heads[h]);
      say(describeHead(l, h));
      drawGrids(); drawHist(); drawStrip(); drawText();
      if (api.span) zoom();
    }

    api.select = (layer, head) => select(data.layers.indexOf(layer), data.heads.indexOf(head));
    api.zoomTo = (q0, q1) => { setSpan(q0, q1, true); return zoom(); };
    api.ready = X.decode(data.top).then((t) => { api.top = t; return api; });
    let best = 0;  // open on the head with the most sink mass: the one that stands out first
    data.grid.sink.forEach((row, l) => row.forEach((v, h) => { if (v != null && v > data.grid.sink[Math.floor(best / NH)][best % NH]) best = l * NH + h; }));
    select(Math.floor(best / NH), best % NH);
    window.addEventListener("resize", () => { drawStrip(); drawText(); if (api.zoomed) drawZoom(api.zoomed); });
    return api;
  }

  window.AttnkitLong = { mount };
  const node = document.getElementById("attnkit-long");
  const dataNode = document.getElementById("attnkit-data");
  if (node && dataNode) window.attnkitLong = mount(node, JSON.parse(dataNode.textContent));
})();
