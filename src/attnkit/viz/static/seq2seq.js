/* attnkit encoder-decoder page: three explorers (explorer.js) on one page, one per part of
 * the model: cross-attention (target tokens on the left, the source tokens they attend to
 * on the right; its "Alignment" tab is the heatmap, rows = target, columns = source), the
 * encoder's self-attention and the decoder's. Text reaches the page through textContent
 * only. Mount with AttnkitSeq2Seq.mount(element, payload). */
(function () {
  "use strict";
  const X = window.AttnkitExplorer, el = X.el;
  const NAMES = { cross: "Cross-attention (target → source)", encoder: "Encoder self-attention", decoder: "Decoder self-attention" };
  /* What each tab's rows and lines are, shown under the tabs. */
  const SHOWS = {
    cross: "Cross-attention: each decoder step (a row, on the left) reading the source tokens (on the right).",
    encoder: "The encoder's self-attention: each source token reading every source token.",
    decoder: "The decoder's causal self-attention: each decoder step reading the target tokens read so far (itself and earlier ones), not the source.",
  };

  function mount(root, data) {
    root.textContent = "";
    root.appendChild(el("div", { class: "akx-head" }, [
      el("div", { class: "akx-title", text: data.title || "encoder-decoder attention" }),
      el("div", { class: "akx-sub", text: `${data.model || "model"} · source ${data.source.length} tokens · target ${data.target.length} tokens` }),
    ]));
    // the findings behind the picture (translate-demo: the head, its controls, the intervention)
    if (data.figures && data.figures.length) {
      root.appendChild(el("ul", { class: "akx-figures" }, data.figures.map((line) => el("li", { text: line }))));
    }
    const bar = el("div", { class: "akx-tabs akx-parts", role: "tablist" });
    root.appendChild(bar);
    const shows = el("p", { class: "akx-hint", "data-role": "part-shows" });
    root.appendChild(shows);
    const api = { part: "cross", parts: {} };
    const holders = {};
    for (const name of ["cross", "encoder", "decoder"]) {
      bar.appendChild(el("button", { class: "akx-tab", "data-part": name, role: "tab", text: NAMES[name], onclick: () => show(name) }));
      holders[name] = el("div", { class: "akx-part", "data-part-pane": name });
      root.appendChild(holders[name]);
      api.parts[name] = X.mount(holders[name], data.parts[name]);
    }
    function show(name) {
      api.part = name;
      shows.textContent = SHOWS[name];
      for (const b of bar.children) b.classList.toggle("akx-active", b.dataset.part === name);
      for (const [n, h] of Object.entries(holders)) h.style.display = n === name ? "" : "none";
      root.dataset.part = name;
    }
    api.show = show;
    api.ready = Promise.all(Object.values(api.parts).map((p) => p.ready)).then(() => api);
    show("cross");
    return api;
  }

  window.AttnkitSeq2Seq = { mount };
  const node = document.getElementById("attnkit-seq2seq");
  const dataNode = document.getElementById("attnkit-data");
  if (node && dataNode) window.attnkitSeq2Seq = mount(node, JSON.parse(dataNode.textContent));
})();
