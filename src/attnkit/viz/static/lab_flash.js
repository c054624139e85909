/* attnkit lab, panel "flash": FlashAttention's online softmax, one key block at a time,
 * for the focused query row i (the last row when no query is focused).
 *
 * Keys are cut into blocks of B. Before block b the page holds only m (the running max),
 * l (the running sum) and acc (the unnormalised output, d numbers). Block b does
 *
 *   m'   = max(m, max_j s_ij)                   over the block's allowed keys
 *   r    = exp(m - m')                          rescales what came before (1 if m' = m)
 *   l'   = r * l + sum_j exp(s_ij - m')
 *   acc' = r * acc + sum_j exp(s_ij - m') v_j
 *   partial output = acc' / l'                  (0 while no key was allowed)
 *
 * After the last block, acc / l is the row's softmax(s_i) V to rounding, and at no point
 * was more than B scores + d + 2 numbers held: never the n x n matrix.
 *
 * api: state() {block, step}; set({block?, step?}) -> state(); result() ->
 *   {row, block, steps: [{start, end, scores, blockMax, maxBefore, max, rescale, sum, acc, partial}],
 *    out, full, maxError, held}
 */
"use strict";
(() => {
  function tiled(scores, v, block) {
    const n = scores.length, d = v[0].length, steps = [];
    let m = -Infinity, l = 0, acc = new Array(d).fill(0);
    for (let start = 0; start < n; start += block) {
      const end = Math.min(n, start + block), part = scores.slice(start, end);
      const blockMax = Math.max(-Infinity, ...part.filter((s) => s !== null));
      const next = Math.max(m, blockMax);
      const rescale = next === m ? 1 : Math.exp(m - next);  // m = -inf before any key: exp(-inf) = 0
      let sum = rescale * l;
      const nextAcc = acc.map((a) => rescale * a);
      for (let j = start; j < end; j++) {
        if (scores[j] === null) continue;
        const e = Math.exp(scores[j] - next);
        sum += e;
        for (let c = 0; c < d; c++) nextAcc[c] += e * v[j][c];
      }
      steps.push({ start, end, scores: part, blockMax, maxBefore: m, max: next, rescale, sum, acc: nextAcc,
        partial: nextAcc.map((a) => (sum > 0 ? a / sum : 0)) });
      m = next; l = sum; acc = nextAcc;
    }
    return steps;
  }

  function make(kit) {
    const { el, fmt, rgb, diverging, ink, MINUS, shown } = kit;
    let block = 2, step = 0, last = null;
    const ui = {
      block: el("input", { type: "range", min: "1", max: "12", step: "1", "data-akl": "flash-block", "aria-label": "block size" }),
      blockText: el("output", { class: "akl-readout", "data-akl": "flash-block-text" }),
      step: el("input", { type: "range", min: "0", max: "0", step: "1", "data-akl": "flash-step", "aria-label": "step" }),
      stepText: el("output", { class: "akl-readout", "data-akl": "flash-step-text" }),
      keys: el("div", { class: "akl-flash-keys", "data-akl": "flash-keys" }),
      story: el("p", { class: "akl-flash-story", "data-akl": "flash-story" }),
      table: el("table", { class: "akl-matrix akl-flash-table", "data-akl": "flash-steps" }),
      verdict: el("p", { class: "akl-flash-verdict", "data-akl": "flash-verdict" }),
    };
    const node = el("section", { class: "akl-panel akl-flash", "data-akl": "flash" },
      el("h2", { text: "FlashAttention, step by step: one query row, one key block at a time" }),
      el("p", { class: "akl-hint", text: "The softmax needs the row's maximum and sum, which are known only after every key. "
        + "FlashAttention keeps a running max m, a running sum l and an unnormalised output, "
        + "and rescales them by exp(m_old \u2212 m_new) whenever a block raises the max." }),
      el("div", { class: "akl-flash-controls" },
        el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: "block size B" }),
          el("span", { class: "akl-control-inputs" }, ui.block, ui.blockText)),
        el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: "step" }),
          el("span", { class: "akl-control-inputs" }, ui.step, ui.stepText))),
      ui.keys, ui.story, ui.table, ui.verdict);

    function compute(state, res) {
      const n = state.tokens.length, row = state.focus ?? n - 1;
      const b = Math.min(block, n), steps = tiled(res.scores[row], state.v, b);
      const out = steps[steps.length - 1].partial, full = res.out[row];
      const maxError = Math.max(...out.map((o, c) => Math.abs(o - full[c])));
      return { row, block: b, steps, out, full, maxError, held: b + state.v[0].length + 2 };
    }

    function drawKeys(state, r, s) {
      const cur = r.steps[s];
      ui.keys.replaceChildren(el("span", { class: "akl-flash-axis", text: `s of \u201c${state.tokens[r.row]}\u201d` }));
      r.steps.forEach((st, b) => {
        const group = el("div", { class: `akl-flash-block ${b < s ? "akl-done" : b === s ? "akl-now" : "akl-later"}`,
          "data-akl": "flash-block-cells" });
        st.scores.forEach((x, t) => {
          const j = st.start + t, top = Math.max(...r.steps.map((q) => Math.abs(q.blockMax)).filter(Number.isFinite), 1);
          const c = x === null ? null : diverging(x / top);
          group.append(el("div", x === null ? { class: "akl-flash-cell akl-masked", title: state.tokens[j] }
            : { class: "akl-flash-cell", style: `background:${rgb(c)};color:${ink(c)}`, title: state.tokens[j] },
          el("span", { class: "akl-flash-token", text: state.tokens[j] }),
          el("span", { text: x === null ? "masked" : fmt(x) })));
        });
        ui.keys.append(group);
      });
      const grew = cur.max > cur.maxBefore && Number.isFinite(cur.maxBefore);
      ui.story.textContent = `Step ${s + 1} of ${r.steps.length}: keys ${cur.start}\u2013${cur.end - 1}. `
        + (Number.isFinite(cur.blockMax) ? `Block max ${fmt(cur.blockMax, 3)}; ` : "Every key of this block is masked; ")
        + (grew ? `the max grows from ${fmt(cur.maxBefore, 3)} to ${fmt(cur.max, 3)}, so the earlier sum and output are multiplied by exp(${fmt(cur.maxBefore, 3)} ${MINUS} ${fmt(cur.max, 3)}) = ${fmt(cur.rescale, 4)}. `
          : !Number.isFinite(cur.max) ? "no key seen yet. "
            : Number.isFinite(cur.maxBefore) ? `the max stays ${fmt(cur.max, 3)}: nothing is rescaled. `
              : `the first allowed keys set m = ${fmt(cur.max, 3)}; there is nothing earlier to rescale. `)
        + `Running sum l = ${fmt(cur.sum, 4)}.`;
    }

    function drawTable(state, r, s) {
      const d = state.v[0].length;
      const head = el("tr", {}, ...["step", "keys", "block max", "m", "rescale", "l"].map((t) => el("th", { text: t })));
      for (let c = 0; c < d; c++) head.append(el("th", { text: `o${c}` }));
      const body = el("tbody");
      r.steps.slice(0, s + 1).forEach((st, b) => {
        const tr = el("tr", { class: b === s ? "akl-focus" : "" }, el("th", { text: String(b + 1) }),
          el("td", { text: `${st.start}\u2013${st.end - 1}` }),
          el("td", { text: Number.isFinite(st.blockMax) ? fmt(st.blockMax, 3) : "\u2014" }),
          el("td", { text: Number.isFinite(st.max) ? fmt(st.max, 3) : `${MINUS}\u221e` }),
          el("td", { class: st.rescale < 1 && st.maxBefore > -Infinity ? "akl-flash-rescaled" : "", text: fmt(st.rescale, 4) }),
          el("td", { text: fmt(st.sum, 4) }));
        const top = Math.max(...st.partial.map(Math.abs), 1e-12);
        for (const o of st.partial) {
          const c = diverging(o / top);
          tr.append(el("td", { style: `background:${rgb(c)};color:${ink(c)}`, title: String(o), text: fmt(o, 3) }));
        }
        body.append(tr);
      });
      ui.table.replaceChildren(el("thead", {}, head), body);
    }

    function drawVerdict(state, r, s) {
      const n = state.tokens.length;
      if (s < r.steps.length - 1) {
        ui.verdict.textContent = `The partial output is the softmax over the ${r.steps[s].end} keys seen so far; `
          + "move the step slider to the end to finish the row.";
        return;
      }
      ui.verdict.textContent = `Done: acc / l equals the full softmax(s)\u00b7V of this row to rounding `
        + `(largest difference ${r.maxError.toExponential(1)}). At most ${r.held} numbers were held `
        + `(B = ${r.block} scores, d = ${state.v[0].length} outputs, m and l); no ${n}\u00d7${n} matrix of scores.`;
    }

    function update(state, res) {
      const n = state.tokens.length;
      last = { state, res };
      ui.block.max = String(n);
      const r = compute(state, res);
      step = Math.min(step, r.steps.length - 1);
      ui.block.value = String(r.block);
      ui.blockText.textContent = `${r.block} key${r.block > 1 ? "s" : ""}`;
      ui.step.max = String(r.steps.length - 1);
      ui.step.value = String(step);
      ui.stepText.textContent = `${step + 1} / ${r.steps.length}`;
      drawKeys(state, r, step);
      drawTable(state, r, step);
      drawVerdict(state, r, step);
    }

    function set(patch) {
      if (patch === null || typeof patch !== "object" || Array.isArray(patch))
        throw new TypeError(`flash.set() takes {block, step}; got ${shown(patch)}`);
      const n = last.state.tokens.length;
      const nb = "block" in patch ? patch.block : block;
      if (!Number.isInteger(nb) || nb < 1 || nb > n) throw new RangeError(`block must be an integer in [1, ${n}]; got ${shown(nb)}`);
      const blocks = Math.ceil(n / nb), ns = "step" in patch ? patch.step : Math.min(step, blocks - 1);
      if (!Number.isInteger(ns) || ns < 0 || ns >= blocks) throw new RangeError(`step must be an integer in [0, ${blocks - 1}]; got ${shown(ns)}`);
      block = nb; step = ns;
      update(last.state, last.res);
      return { block, step };
    }

    node.addEventListener("input", (event) => {
      const kind = event.target.dataset.akl, value = Number(event.target.value);
      if (kind === "flash-block") set({ block: value, step: 0 });
      else if (kind === "flash-step") set({ step: value });
    });

    return {
      name: "flash", node, update,
      api: { state: () => ({ block, step }), set, result: () => compute(last.state, last.res) },
    };
  }

  (window.AttnkitLabPanels = window.AttnkitLabPanels ?? []).push(make);
})();
