/* attnkit lab, panel "flash": FlashAttention's online softmax, one key block at a time,
 * for one query row i.
 *
 * Which row: the panel's own choice if one is set, else (auto) the focused query row if its
 * running max rises at some block, so that a rescale shows; else the row whose smallest
 * rescale factor is smallest (ties: the lowest row; the last row when none rises). Which step:
 * the one set, else (auto) the first step that rescales, else step 1.
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
 * api: state() {block, step, row} (step, row: an int, or null for auto); set({block?, step?, row?})
 *   -> state() (a new block puts the step back to auto); result() ->
 *   {row, step, block, why, steps: [{start, end, scores, blockMax, maxBefore, max, rescale, sum, acc,
 *    partial}], out, full, maxError, held}; why: "chosen", "focused", "rises" or "none rises".
 *   A step's rescale is exp(m_old - m_new), 1 when the max stays and 0 before any key
 *   (the page shows "\u2014" for the latter: there is nothing to rescale).
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

  const rises = (st) => Number.isFinite(st.maxBefore) && st.max > st.maxBefore;
  const smallestRescale = (steps) => Math.min(...steps.filter(rises).map((st) => st.rescale));

  // the row to show: {row, why}, as the header comment says
  function pickRow(res, v, b, focus) {
    const n = res.scores.length, rescales = res.scores.map((row) => smallestRescale(tiled(row, v, b)));
    if (focus !== null && rescales[focus] < 1) return { row: focus, why: "focused" };
    const best = rescales.indexOf(Math.min(...rescales));
    return rescales[best] < 1 ? { row: best, why: "rises" } : { row: focus ?? n - 1, why: "none rises" };
  }

  function make(kit) {
    const { el, fmt, small, rgb, diverging, ink, MINUS, shown } = kit;
    let block = 2, step = null, row = null, last = null;
    const ui = {
      block: el("input", { type: "range", min: "1", max: "12", step: "1", "data-akl": "flash-block", "aria-label": "block size" }),
      blockText: el("output", { class: "akl-readout", "data-akl": "flash-block-text" }),
      step: el("input", { type: "range", min: "0", max: "0", step: "1", "data-akl": "flash-step", "aria-label": "step" }),
      stepText: el("output", { class: "akl-readout", "data-akl": "flash-step-text" }),
      row: el("select", { "data-akl": "flash-row", "aria-label": "query row" }),
      why: el("p", { class: "akl-flash-why", "data-akl": "flash-why" }),
      keys: el("div", { class: "akl-flash-keys", "data-akl": "flash-keys" }),
      story: el("p", { class: "akl-flash-story", "data-akl": "flash-story" }),
      table: el("table", { class: "akl-matrix akl-flash-table", "data-akl": "flash-steps" }),
      verdict: el("p", { class: "akl-flash-verdict", "data-akl": "flash-verdict" }),
    };
    const node = el("section", { class: "akl-panel akl-flash", "data-akl": "flash" },
      el("h2", { text: "FlashAttention, step by step: one query row, one key block at a time" }),
      el("p", { class: "akl-hint", text: "The softmax needs the row's maximum and sum, which are known only after every key. "
        + "FlashAttention keeps a running max m, a running sum l and an unnormalised output acc, "
        + "and rescales l and acc by exp(m_old \u2212 m_new) whenever a block raises the max. "
        + "Only at the end is acc divided by l." }),
      el("div", { class: "akl-flash-controls" },
        el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: "query row" }),
          el("span", { class: "akl-control-inputs" }, ui.row)),
        el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: "block size B" }),
          el("span", { class: "akl-control-inputs" }, ui.block, ui.blockText)),
        el("label", { class: "akl-control" }, el("span", { class: "akl-control-name", text: "step" }),
          el("span", { class: "akl-control-inputs" }, ui.step, ui.stepText))),
      ui.why, ui.keys, ui.story, ui.table, ui.verdict);

    function compute(state, res) {
      const n = state.tokens.length, b = Math.min(block, n);
      const pick = row !== null && row < n ? { row, why: "chosen" } : pickRow(res, state.v, b, state.focus);
      const steps = tiled(res.scores[pick.row], state.v, b);
      const first = steps.findIndex(rises), s = step !== null ? Math.min(step, steps.length - 1) : Math.max(first, 0);
      const out = steps[steps.length - 1].partial, full = res.out[pick.row];
      const maxError = Math.max(...out.map((o, c) => Math.abs(o - full[c])));
      return { row: pick.row, why: pick.why, step: s, block: b, steps, out, full, maxError, held: b + state.v[0].length + 2 };
    }

    function whyText(state, r) {
      const name = (i) => `\u201c${state.tokens[i]}\u201d (query ${i})`;
      if (r.why === "chosen") return `Row ${name(r.row)}, as chosen.`;
      if (r.why === "focused") return `Row ${name(r.row)}, the focused query: its maximum rises across the blocks.`;
      if (r.why === "rises") return `Row ${name(r.row)}: its maximum rises across the blocks, so the rescale shows`
        + (state.focus === null ? "." : `; the focused query ${name(state.focus)} has its maximum in its first block `
          + "at this B, so nothing of it would be rescaled.");
      return `No row's maximum rises at B = ${r.block}: every row meets its maximum in its first block. `
        + "Try another block size, or drag a later key's vector.";
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
        + (grew ? `the max grows from ${fmt(cur.maxBefore, 3)} to ${fmt(cur.max, 3)}, so the earlier sum l and accumulator acc are multiplied by exp(${fmt(cur.maxBefore, 3)} ${MINUS} ${fmt(cur.max, 3)}) = ${fmt(cur.rescale, 4)}. `
          : !Number.isFinite(cur.max) ? "no key seen yet. "
            : Number.isFinite(cur.maxBefore) ? `the max stays ${fmt(cur.max, 3)}: nothing is rescaled. `
              : `the first allowed keys set m = ${fmt(cur.max, 3)}; there is nothing earlier to rescale. `)
        + `Running sum l = ${fmt(cur.sum, 4)}.`;
    }

    function drawTable(state, r, s) {
      const d = state.v[0].length, th = (text, attrs = {}) => el("th", { ...attrs, text });
      const groups = el("tr", {}, el("th", { colspan: "6" }),
        th("acc: unnormalised, \u03a3 exp(s \u2212 m)\u00b7v", { colspan: String(d), class: "akl-flash-group" }),
        th("acc / l: the partial output", { colspan: String(d), class: "akl-flash-group" }));
      const head = el("tr", {}, ...["step", "keys", "block max", "m", "rescale", "l"].map((t) => th(t)),
        ...Array.from({ length: d }, (_, c) => th(`acc${c}`, { "data-akl": "flash-acc-head" })),
        ...Array.from({ length: d }, (_, c) => th(`o${c}`, { "data-akl": "flash-out-head" })));
      const cells = (values, kind) => {
        const top = Math.max(...values.map(Math.abs), 1e-12);
        return values.map((x) => {
          const c = diverging(x / top);
          return el("td", { "data-akl": kind, style: `background:${rgb(c)};color:${ink(c)}`, title: String(x), text: fmt(x, 3) });
        });
      };
      const body = el("tbody");
      r.steps.slice(0, s + 1).forEach((st, b) => {
        const nothing = !Number.isFinite(st.maxBefore);  // no key before this block: nothing to rescale
        body.append(el("tr", { class: b === s ? "akl-focus" : "" }, el("th", { text: String(b + 1) }),
          el("td", { text: `${st.start}\u2013${st.end - 1}` }),
          el("td", { text: Number.isFinite(st.blockMax) ? fmt(st.blockMax, 3) : "\u2014" }),
          el("td", { text: Number.isFinite(st.max) ? fmt(st.max, 3) : `${MINUS}\u221e` }),
          el("td", { "data-akl": "flash-rescale", class: rises(st) ? "akl-flash-rescaled" : "",
            title: nothing ? "no earlier key: nothing to rescale" : String(st.rescale), text: nothing ? "\u2014" : fmt(st.rescale, 4) }),
          el("td", { text: fmt(st.sum, 4) }), ...cells(st.acc, "flash-acc"), ...cells(st.partial, "flash-out")));
      });
      ui.table.replaceChildren(el("thead", {}, groups, head), body);
    }

    function drawVerdict(state, r, s) {
      const n = state.tokens.length;
      if (s < r.steps.length - 1) {
        ui.verdict.textContent = `The partial output is the softmax over the ${r.steps[s].end} keys seen so far; `
          + "move the step slider to the end to finish the row.";
        return;
      }
      ui.verdict.textContent = `Done: acc / l equals the full softmax(s)\u00b7V of this row to rounding `
        + `(largest difference ${small(r.maxError)}). At most ${r.held} numbers were held `
        + `(B = ${r.block} scores, d = ${state.v[0].length} outputs, m and l); no ${n}\u00d7${n} matrix of scores.`;
    }

    function update(state, res) {
      const n = state.tokens.length;
      last = { state, res };
      if (row !== null && row >= n) row = null;
      ui.block.max = String(n);
      const r = compute(state, res);
      if (step !== null) step = r.step;
      ui.block.value = String(r.block);
      ui.blockText.textContent = `${r.block} key${r.block > 1 ? "s" : ""}`;
      ui.step.max = String(r.steps.length - 1);
      ui.step.value = String(r.step);
      ui.stepText.textContent = `${r.step + 1} / ${r.steps.length}`;
      ui.row.replaceChildren(el("option", { value: "auto", text: "auto: a row that rescales" }),
        ...state.tokens.map((t, i) => el("option", { value: String(i), text: `${i}: ${t}` })));
      ui.row.value = row === null ? "auto" : String(row);
      ui.why.textContent = whyText(state, r);
      drawKeys(state, r, r.step);
      drawTable(state, r, r.step);
      drawVerdict(state, r, r.step);
    }

    function set(patch) {
      if (patch === null || typeof patch !== "object" || Array.isArray(patch))
        throw new TypeError(`flash.set() takes {block, step, row}; got ${shown(patch)}`);
      const n = last.state.tokens.length;
      const nb = "block" in patch ? patch.block : block;
      if (!Number.isInteger(nb) || nb < 1 || nb > n) throw new RangeError(`block must be an integer in [1, ${n}]; got ${shown(nb)}`);
      const nr = "row" in patch ? patch.row : row;
      if (nr !== null && (!Number.isInteger(nr) || nr < 0 || nr >= n)) throw new RangeError(`row must be null (auto) or an integer in [0, ${n - 1}]; got ${shown(nr)}`);
      const blocks = Math.ceil(n / nb), ns = "step" in patch ? patch.step : "block" in patch ? null : step;
      if (ns !== null && (!Number.isInteger(ns) || ns < 0 || ns >= blocks))
        throw new RangeError(`step must be null (auto) or an integer in [0, ${blocks - 1}]; got ${shown(ns)}`);
      block = nb; step = ns; row = nr;
      update(last.state, last.res);
      return { block, step, row };
    }

    node.addEventListener("input", (event) => {
      const kind = event.target.dataset.akl, value = Number(event.target.value);
      if (kind === "flash-block") set({ block: value });
      else if (kind === "flash-step") set({ step: value });
      else if (kind === "flash-row") set({ row: event.target.value === "auto" ? null : value, step: null });
    });

    return {
      name: "flash", node, update,
      api: { state: () => ({ block, step, row }), set, result: () => compute(last.state, last.res) },
    };
  }

  (window.AttnkitLabPanels = window.AttnkitLabPanels ?? []).push(make);
})();
