/* attnkit compare report: one word in two sentences (attnkit.viz.contexts). The summary, the
 * per-layer cosine of the word's hidden state between the sentences against a shared word's
 * (an inline SVG), where the word attends per layer in each sentence, and the two sentences'
 * explorers (stacked below ~2400 px, side by side above; explorer.css). Needs explorer.js and report_cost.js (for its svg helper). Text
 * reaches the page through textContent only. */
(function () {
  "use strict";

  const { svg, el } = window.AttnkitCost;  // report_cost.js: the page's two element builders

  /* Both words' cosines against the hidden state (emb, then each layer). */
  function cosineChart(data) {
    const W = 520, H = 230, L = 44, R = 130, T = 12, B = 34;
    const n = data.token_cosine.length;
    const others = Object.entries(data.shared || {}).filter(([word]) => word !== data.anchor);
    const all = data.token_cosine.concat(data.anchor_cosine, ...others.map(([, ys]) => ys));
    const lo = data.axis_floor ?? Math.min(0, ...all);  // contexts.ContextComparison.axis_floor: where the axis starts
    const X = (i) => L + (W - L - R) * i / Math.max(n - 1, 1);
    const Y = (c) => T + (H - T - B) * (1 - (c - lo) / (1 - lo));
    const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-role": "cosine-chart", role: "img",
      "aria-label": "cosine similarity between the sentences per layer" });
    chart.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    chart.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
    for (const c of [lo, (lo + 1) / 2, 1]) chart.appendChild(svg("text", { x: L - 6, y: Y(c) + 4, "text-anchor": "end", class: "akc-tick" }, c.toFixed(2)));
    const names = ["emb", ...data.layers.map(String)];
    names.forEach((name, i) => chart.appendChild(svg("text", { x: X(i), y: H - B + 16, "text-anchor": "middle", class: "akc-tick" }, name)));
    chart.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "akc-tick" }, "after the embeddings, then each layer"));
    // The layers where the word moves more than every shared word, shaded: the headline's own numbers.
    for (const layer of data.moves_more_after_layers || []) {
      const x = X(data.layers.indexOf(layer) + 1);
      chart.appendChild(svg("rect", { x: x - 8, y: T, width: 16, height: H - T - B, fill: "#e15759", opacity: 0.1, "data-role": "moves-more" }));
    }
    // The other shared words, thin and grey, under the two named lines.
    for (const [word, ys] of others) {
      const line = svg("polyline", { points: ys.map((c, i) => `${X(i).toFixed(1)},${Y(c).toFixed(1)}`).join(" "),
        fill: "none", stroke: "#bbb", "stroke-width": 1, "data-series": "shared" });
      line.appendChild(svg("title", {}, `${word}: cos ${ys[n - 1].toFixed(3)} after the last layer`));
      chart.appendChild(line);
    }
    if (others.length) chart.appendChild(svg("text", { x: W - R + 8, y: T + 8, fill: "#999", class: "akc-tick" }, `grey: ${others.length} other${others.length > 1 ? "s" : ""}`));
    const series = [["token", data.token_cosine, "#e15759", data.token], ["anchor", data.anchor_cosine, "#4e79a7", data.anchor]];
    // The two end labels, at least a line (12 px) apart so that close cosines do not print over each other.
    const ends = series.map(([, ys]) => Y(ys[n - 1]));
    if (Math.abs(ends[0] - ends[1]) < 12) {
      const mid = (ends[0] + ends[1]) / 2, up = ends[0] <= ends[1] ? 0 : 1;
      ends[up] = mid - 6; ends[1 - up] = mid + 6;
    }
    // The shared word that moved most (the headline names it), labelled at its end when there is room.
    if (others.length) {
      const [word, ys] = others.reduce((a, b) => (b[1][n - 1] < a[1][n - 1] ? b : a));
      const y = Y(ys[n - 1]);
      if (ends.every((e) => Math.abs(e - y) >= 12)) chart.appendChild(svg("text", { x: W - R + 8, y: y + 4, fill: "#999", class: "akc-tick", "data-role": "lowest-label" }, word));
    }
    series.forEach(([key, ys, colour, word], s) => {
      chart.appendChild(svg("polyline", { points: ys.map((c, i) => `${X(i).toFixed(1)},${Y(c).toFixed(1)}`).join(" "),
        fill: "none", stroke: colour, "stroke-width": 2, "stroke-dasharray": s ? "5 3" : "none", "data-series": key }));
      ys.forEach((c, i) => {
        const dot = svg("circle", { cx: X(i).toFixed(1), cy: Y(c).toFixed(1), r: 3, fill: colour, "data-series": key });
        dot.appendChild(svg("title", {}, `${word} at ${names[i]}: cos ${c.toFixed(3)}`));
        chart.appendChild(dot);
      });
      chart.appendChild(svg("text", { x: W - R + 8, y: ends[s] + 4, fill: colour, class: "akc-tick", "data-role": "end-label" }, word));
    });
    return chart;
  }

  function attendsCell(entry) {
    const mean = entry.mean.map(([tok, w]) => `${tok} ${w.toFixed(2)}`).join(", ");
    return el("td", {}, [el("div", { text: mean }),
      el("div", { class: "akx-hint", text: `best head ${entry.head}: ${entry.head_key} ${entry.head_weight.toFixed(2)}` })]);
  }

  function table(data) {
    const t = el("table", { class: "akx-table akp-table", "data-role": "per-layer" });
    t.appendChild(el("thead", {}, [el("tr", {}, [el("th", { text: "layer" }), el("th", { text: `cos ${data.token}` }),
      el("th", { text: `cos ${data.anchor}` }), el("th", { text: `${data.token} attends to: sentence 1` }),
      el("th", { text: "sentence 2" })])]));
    const body = el("tbody");
    data.layers.forEach((layer, i) => {
      body.appendChild(el("tr", { "data-layer": String(layer) }, [el("td", { text: String(layer) }),
        el("td", { text: data.token_cosine[i + 1].toFixed(3) }), el("td", { text: data.anchor_cosine[i + 1].toFixed(3) }),
        attendsCell(data.attends[0][i]), attendsCell(data.attends[1][i])]));
    });
    t.appendChild(body);
    return t;
  }

  function mount(root, data) {
    root.classList.add("akx-root");
    root.appendChild(el("div", { class: "akx-head" }, [
      el("div", { class: "akx-title", text: `"${data.token}" in two contexts` }),
      el("div", { class: "akx-sub", text: `${data.model} · compared with "${data.anchor}", a word both sentences share` })]));
    const texts = el("ol", { class: "akp-texts" }, data.texts.map((t) => el("li", { text: t })));
    root.appendChild(texts);
    root.appendChild(el("p", { class: "akp-summary", "data-role": "summary", text: data.summary }));
    root.appendChild(el("div", { class: "akp-row" }, [cosineChart(data), el("div", {}, [
      el("p", { class: "akx-hint", text: "Cosine similarity of each word's hidden state in sentence 1 and in " +
        "sentence 2 (1: unchanged). Context moves every token; a word read differently should move more than " +
        "the words around it. Shaded: the layers where it does." }),
      el("p", { class: "akx-hint", "data-role": "rule", text: "The rule: " + (data.rule || "") })])]));
    root.appendChild(table(data));
    const sides = el("div", { class: "akp-sides" });
    const apis = [data.left, data.right].map((payload, i) => {
      const holder = el("div", { class: "akp-side", "data-side": String(i) });
      sides.appendChild(el("div", {}, [el("div", { class: "akp-caption", text: `sentence ${i + 1}: ${data.texts[i]}` }), holder]));
      return holder;
    });
    root.appendChild(sides);
    const explorers = apis.map((holder, i) => window.AttnkitExplorer.mount(holder, i ? data.right : data.left));
    return { left: explorers[0], right: explorers[1], ready: Promise.all(explorers.map((e) => e.ready)) };
  }

  const node = document.getElementById("attnkit-compare");
  const dataNode = document.getElementById("attnkit-data");
  if (node && dataNode) window.attnkitCompare = mount(node, JSON.parse(dataNode.textContent));
})();
