/* attnkit generation page: the text a model generated, growing token by token (a slider
 * and step buttons). Click a generated token to see the attention that produced it: the
 * row of the token before it over every earlier token (decoder self-attention) and, for an
 * encoder-decoder, over the source tokens (cross-attention); the mean of all heads of a
 * layer, or one head. Text reaches the page through textContent only. Mount with
 * AttnkitGeneration.mount(element, payload). */
(function () {
  "use strict";
  const X = window.AttnkitExplorer, el = X.el;

  function mount(root, data) {
    root.textContent = "";
    root.classList.add("akx-root");
    const status = el("div", { class: "akx-status", text: "decoding the attention maps…" });
    root.appendChild(status);
    const api = {};
    const parts = [X.decode(data.decoder), data.cross ? X.decode(data.cross) : Promise.resolve(null)];
    api.ready = Promise.all(parts).then(([dec, crs]) => { status.remove(); build(root, data, dec, crs, api); return api; });
    api.ready.catch((err) => {
      root.textContent = "";
      root.appendChild(el("div", { class: "akx-status", text: "could not show the maps: " + err.message }));
      console.error(err);
    });
    return api;
  }

  function build(root, data, dec, crs, api) {
    const tokens = data.tokens, T = tokens.length, P = data.prompt, L = data.layers.length, H = data.heads.length;
    const source = data.source || [];
    const state = { shown: T, token: T - 1, layer: L - 1, head: null };

    /* The row that produced token p (read at step p - 1): the mean of the chosen heads. */
    function row(sp, p) {
      if (!sp) return null;
      const heads = state.head == null ? [...Array(H).keys()] : [state.head];
      const layer = Math.min(state.layer, sp.M / H - 1);
      return Array.from(X.aggregateRow(sp, heads.map((h) => layer * H + h), p - 1, new Float32Array(sp.Lk)));
    }

    root.appendChild(el("div", { class: "akx-head" }, [
      el("div", { class: "akx-title", text: data.title || "generation" }),
      el("div", { class: "akx-sub", text: `${data.model || "model"} · ${P} prompt tokens + ${T - P} generated · ${L} layers × ${H} heads` }),
    ]));

    const layerSel = el("select", { "data-control": "layer", "aria-label": "layer" });
    data.layers.forEach((l, i) => layerSel.appendChild(el("option", { value: String(i), text: `layer ${l}` })));
    layerSel.addEventListener("change", () => { state.layer = +layerSel.value; redraw(); });
    const headSel = el("select", { "data-control": "head", "aria-label": "head" });
    headSel.appendChild(el("option", { value: "", text: "mean of all heads" }));
    data.heads.forEach((h, i) => headSel.appendChild(el("option", { value: String(i), text: `head ${h}` })));
    headSel.addEventListener("change", () => { state.head = headSel.value === "" ? null : +headSel.value; redraw(); });
    const step = el("input", { type: "range", min: String(P), max: String(T), step: "1", value: String(T), "data-control": "step", "aria-label": "tokens shown" });
    step.addEventListener("input", () => grow(+step.value));
    const stepLbl = el("span", { class: "akx-num" });
    const prev = el("button", { class: "akx-btn", "data-control": "prev", text: "◀ step", onclick: () => grow(state.shown - 1) });
    const next = el("button", { class: "akx-btn", "data-control": "next", text: "step ▶", onclick: () => grow(state.shown + 1) });
    root.appendChild(el("div", { class: "akx-controls" }, [
      el("label", {}, [el("span", { text: "Layer" }), layerSel]),
      el("label", {}, [el("span", { text: "Heads" }), headSel]),
      el("div", { class: "akx-row" }, [el("span", { text: "Generated" }), prev, step, next, stepLbl]),
    ]));

    const text = el("div", { class: "akx-gtext", "data-view": "text" });
    const info = el("div", { class: "akx-info akx-ginfo" });
    const srcView = el("div", { class: "akx-gtext", "data-view": "source" });
    root.appendChild(el("p", { class: "akx-hint", text: "Prompt tokens are grey. Click a generated token to see where the model looked when it produced it: earlier tokens are shaded by their weight" + (data.cross ? ", and so are the source tokens below." : ".") }));
    root.appendChild(el("div", { class: "akx-body" }, [el("div", { class: "akx-main" }, [text, ...(data.cross ? [el("div", { class: "akx-cardt", text: "Source (cross-attention)" }), srcView] : [])]), info]));

    function grow(n) {
      state.shown = Math.max(P, Math.min(T, n));
      state.token = state.shown > P ? state.shown - 1 : null;
      redraw();
    }
    function pick(p) { state.token = state.token === p ? null : p; redraw(); }

    function shade(span, v) {
      span.dataset.weight = String(v);
      span.style.background = X.heatCss(v);
      span.style.color = v > 0.35 ? "#fff" : "";
      span.title = X.fmt(v);
    }

    function redraw() {
      layerSel.value = String(state.layer);
      headSel.value = state.head == null ? "" : String(state.head);
      step.value = String(state.shown);
      stepLbl.textContent = `${state.shown - P} of ${T - P}`;
      const self = state.token == null ? null : row(dec, state.token);
      text.textContent = "";
      for (let i = 0; i < state.shown; i++) {
        const span = el("span", { class: "akx-gtok" + (i < P ? " akx-prompt" : " akx-gen"), "data-index": String(i), text: tokens[i] });
        if (i >= P) span.addEventListener("click", () => pick(i));
        if (i === state.token) span.classList.add("akx-picked");
        else if (self && i < state.token) shade(span, self[i]);
        text.appendChild(span);
      }
      srcView.textContent = "";
      const crossRow = state.token == null ? null : row(crs, state.token);
      source.forEach((t, j) => {
        const span = el("span", { class: "akx-gtok", "data-index": String(j), text: t });
        if (crossRow) shade(span, crossRow[j]);
        srcView.appendChild(span);
      });
      info.textContent = "";
      const head = state.head == null ? "mean of all heads" : `head ${data.heads[state.head]}`;
      info.appendChild(el("div", { class: "akx-cardt", text: `layer ${data.layers[state.layer]}, ${head}` }));
      if (state.token == null) {
        info.appendChild(el("p", { class: "akx-hint", text: "Click a generated token." }));
      } else {
        info.appendChild(el("p", { class: "akx-focus" }, [el("span", { text: "generated " }), el("b", { text: tokens[state.token] }), el("span", { text: ` #${state.token}` })]));
        top(info, "looked at (earlier tokens)", self.slice(0, state.token), tokens);
        if (crossRow) top(info, "looked at (source)", crossRow, source);
      }
      root.dataset.state = JSON.stringify(api.state());
    }
    function top(box, title, values, names) {
      box.appendChild(el("div", { class: "akx-hint", text: title }));
      const order = values.map((_, j) => j).filter((j) => values[j] > 0).sort((a, b) => values[b] - values[a]).slice(0, 8);
      const list = el("ol", { class: "akx-list" });
      for (const j of order) {
        const bar = el("span", { class: "akx-bar" });
        bar.style.width = `${(values[j] * 100).toFixed(1)}%`;
        list.appendChild(el("li", {}, [el("span", { class: "akx-tok", text: names[j] }), el("span", { class: "akx-idx", text: `#${j}` }), el("span", { class: "akx-val", text: X.fmt(values[j]) }), bar]));
      }
      box.appendChild(list);
    }

    /* For tests and scripting. */
    api.state = () => ({ shown: state.shown, token: state.token, layer: data.layers[state.layer], head: state.head == null ? null : data.heads[state.head] });
    api.set = (s) => {
      if (s.layer != null) { const i = data.layers.indexOf(s.layer); if (i < 0) throw new RangeError(`layer must be one of ${data.layers.join(", ")}; got ${s.layer}`); state.layer = i; }
      if ("head" in s) { const i = s.head == null ? null : data.heads.indexOf(s.head); if (i != null && i < 0) throw new RangeError(`head must be null or one of ${data.heads.join(", ")}; got ${s.head}`); state.head = i; }
      if (s.shown != null) grow(s.shown);
      if ("token" in s) {
        if (s.token !== null && !(Number.isInteger(s.token) && s.token >= P && s.token < state.shown)) throw new RangeError(`token must be null or a generated token index in [${P}, ${state.shown}); got ${s.token}`);
        state.token = s.token;
      }
      redraw(); return api.state();
    };
    api.row = (part, p) => row(part === "cross" ? crs : dec, p);
    redraw();
  }

  window.AttnkitGeneration = { mount };
  const node = document.getElementById("attnkit-generation");
  const dataNode = document.getElementById("attnkit-data");
  if (node && dataNode) window.attnkitGeneration = mount(node, JSON.parse(dataNode.textContent));
})();
