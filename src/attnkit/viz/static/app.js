/* attnkit serve: the app around the explorer and the lab.
 *
 * Type text, press Enter (Shift+Enter: a new line): the page POSTs {"text"} to
 * /api/explain on its own origin and mounts the answer. The model's kind (config.kind)
 * adds a field: an encoder-decoder's target (sent as "target"; empty: the model writes
 * one) or, for a model that generates alone, how many tokens to generate (sent as
 * "generate" when above 0, at most config.max_generate). The answer is mounted by the
 * report's own scripts: AttnkitExplorer.mount (self-attention), AttnkitSeq2Seq.mount
 * (kind "seq2seq": cross-attention, encoder, decoder) or AttnkitGeneration.mount (kind
 * "generation"). The lab is mounted with AttnkitLab.mount the first time its tab opens.
 * In the Lab tab the text box feeds the lab: its first 12 words (each cut to 64 characters)
 * become the lab's tokens as they are typed, labelling the lab's random vectors (the page
 * says so); Enter runs no model there, and the Explorer tab's own fields are hidden.
 * Settings (model, kind, limits, the example text) come from the JSON in #attnkit-data.
 * Every message, the server's included, reaches the screen through textContent only.
 *
 * window.attnkitApp, for tests and scripting:
 *   status          "idle" | "busy" | "ready" | "error" (also #aks-app[data-status])
 *   explorer, lab   the mounted APIs, or null
 *   view            "explorer" | "seq2seq" | "generation": what the explorer pane shows
 *   explain(text)   a promise, settled once the answer has drawn or the error shows
 *   showTab(name)   "explorer" | "lab"
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const root = $("aks-app");
  if (!root) return;
  const config = JSON.parse($("attnkit-data").textContent);
  const ui = {
    form: $("aks-form"), text: $("aks-text"), submit: $("aks-submit"), busy: $("aks-busy"),
    error: $("aks-error"), hint: $("aks-hint"), meta: $("aks-meta"), empty: $("aks-empty"),
    label: $("aks-text-label"), target: $("aks-target"), targetRow: $("aks-target-row"),
    generate: $("aks-generate"), generateRow: $("aks-generate-row"),
    explorer: $("akx-app-explorer"), lab: $("akl-app-lab"),
    tabs: Array.from(document.querySelectorAll("[data-app-tab]")),
    panes: Array.from(document.querySelectorAll("[data-app-pane]")),
  };

  const app = { status: "idle", explorer: null, lab: null, view: null, tab: "explorer", explain, showTab };
  const seq2seq = config.kind === "encoder-decoder", generates = config.kind === "decoder";
  window.attnkitApp = app;

  ui.meta.replaceChildren(
    chip("model", config.model),
    chip("shape", `${config.layers} layers × ${config.heads} heads`),
    chip("limit", `up to ${config.max_tokens.toLocaleString("en-US")} tokens`));
  const EXPLAIN_HINT = "Enter explains · Shift+Enter starts a new line";
  ui.hint.textContent = EXPLAIN_HINT;
  if (seq2seq) {
    ui.targetRow.hidden = false;
    ui.label.textContent = "Source";
    ui.meta.appendChild(chip("kind", "encoder-decoder"));
  } else if (generates) {
    ui.generateRow.hidden = false;
    ui.generate.max = String(config.max_generate);
    ui.label.textContent = "Text (the prompt, when generating)";
    ui.generate.title = `0: the text's own attention; 1 to ${config.max_generate}: generate that many tokens (greedy)`;
  }

  function chip(kind, text) {
    const span = document.createElement("span");
    span.className = `aks-chip aks-chip-${kind}`;
    span.textContent = text;
    return span;
  }

  function setStatus(status, note) {
    app.status = status;
    root.dataset.status = status;
    ui.submit.disabled = status === "busy";
    ui.text.setAttribute("aria-busy", String(status === "busy"));
    ui.busy.textContent = note || "";
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  /* The request body: the text, and the model kind's own field. Throws on a bad count. */
  function body(text) {
    if (seq2seq) return { text, target: ui.target.value };
    const raw = generates ? ui.generate.value.trim() : "";
    if (raw === "" || raw === "0") return { text };
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 0 || n > config.max_generate) {
      throw new Error(`Generate tokens must be a whole number from 0 to ${config.max_generate}; got ${raw}.`);
    }
    return { text, generate: n };
  }

  function isPayload(data) {
    if (!data) return false;
    if (data.kind === "seq2seq") return !!data.parts && ["cross", "encoder", "decoder"].every((p) => data.parts[p] && data.parts[p].encoding);
    if (data.kind === "generation") return Array.isArray(data.tokens) && !!data.decoder;
    return Array.isArray(data.tokens) && !!data.encoding;
  }

  async function request(sent) {
    let response;
    try {
      response = await fetch("/api/explain", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(sent),
        cache: "no-store", credentials: "same-origin",
      });
    } catch (err) {
      throw new Error("Could not reach the attnkit server. Is `attnkit serve` still running?");
    }
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    if (!response.ok) {
      const said = data && typeof data.error === "string" ? data.error : `${response.status} ${response.statusText}`;
      throw new Error(`The server could not explain this text (${response.status}): ${said}`);
    }
    if (!isPayload(data)) throw new Error("The server's answer is not an explorer payload.");
    return data;
  }

  async function explain(value) {
    const text = value == null ? ui.text.value : String(value);
    if (app.status === "busy") return;
    if (!text.trim()) { showError("Type some text first."); setStatus("error"); return; }
    clearError();
    setStatus("busy", "Running the model…");
    const started = performance.now();
    try {
      const data = await request(body(text));
      setStatus("busy", "Drawing…");
      // A fresh holder per text: the explorer keeps its listeners on the nodes it builds.
      const holder = document.createElement("div");
      ui.explorer.replaceChildren(holder);
      ui.empty.hidden = true;
      const view = data.kind === "seq2seq" ? "seq2seq" : data.kind === "generation" ? "generation" : "explorer";
      const mount = { explorer: window.AttnkitExplorer, seq2seq: window.AttnkitSeq2Seq, generation: window.AttnkitGeneration }[view].mount;
      const api = mount(holder, data);
      await api.ready;
      app.explorer = api;
      app.view = view;
      root.dataset.view = view;
      showTab("explorer");
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const size = view === "seq2seq" ? `${data.source.length} → ${data.target.length} tokens`
        : view === "generation" ? `${data.prompt} + ${data.tokens.length - data.prompt} tokens` : `${data.tokens.length} tokens`;
      setStatus("ready", `${size} · ${seconds} s`);
    } catch (err) {
      showError(err && err.message ? err.message : String(err));
      setStatus("error");
    }
  }

  /* The lab's tokens from the text box: as many of its first words as the lab takes, each cut to
   * the lab's longest label, or null under the fewest it takes (lab.js's LIMITS). */
  const { minTokens, maxTokens: LAB_TOKENS, maxLabel } = window.AttnkitLab.LIMITS;
  const words = (text) => text.split(/\s+/).filter(Boolean);
  function labTokens(text) {
    const tokens = words(text).slice(0, LAB_TOKENS).map((w) => Array.from(w).slice(0, maxLabel).join(""));
    return tokens.length >= minTokens ? tokens : null;
  }

  function syncLab() {
    const tokens = labTokens(ui.text.value), count = words(ui.text.value).length;
    if (tokens) app.lab.set({ tokens });
    ui.hint.textContent = tokens === null
      ? `The lab needs ${minTokens} or more words; it keeps its ${app.lab.state().tokens.length} tokens until the text has them.`
      : `The lab's tokens are the text's ${count > LAB_TOKENS ? `first ${LAB_TOKENS} of ${count}` : count} words, `
        + "as you type. They label random vectors: the lab shows how attention computes, not what the model does "
        + "(the Explorer tab runs the model on this text).";
  }

  const explainLabel = ui.label.textContent;
  function showTab(name) {
    if (name !== "explorer" && name !== "lab") throw new RangeError(`showTab takes "explorer" or "lab"; got ${name}`);
    app.tab = name;
    for (const tab of ui.tabs) {
      const on = tab.dataset.appTab === name;
      tab.classList.toggle("aks-on", on);
      tab.setAttribute("aria-selected", String(on));
    }
    for (const pane of ui.panes) pane.hidden = pane.dataset.appPane !== name;
    const lab = name === "lab";
    ui.targetRow.hidden = lab || !seq2seq;
    ui.generateRow.hidden = lab || !generates;
    ui.submit.textContent = lab ? "Use in lab" : "Explain";
    ui.label.textContent = lab ? "Text: its words become the lab's tokens" : explainLabel;
    if (!lab) { ui.hint.textContent = EXPLAIN_HINT; return; }
    // Mounted when first shown, so that its canvas is sized to a visible pane.
    if (!app.lab) {
      const tokens = labTokens(ui.text.value);
      app.lab = window.AttnkitLab.mount(ui.lab, tokens && { tokens, tokens_from: "the words of the text box" });
    }
    syncLab();
  }

  const submit = () => (app.tab === "lab" ? syncLab() : explain());
  ui.form.addEventListener("submit", (ev) => { ev.preventDefault(); submit(); });
  ui.text.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); submit(); }
  });
  ui.text.addEventListener("input", () => { if (app.tab === "lab") syncLab(); });
  for (const tab of ui.tabs) tab.addEventListener("click", () => showTab(tab.dataset.appTab));

  showTab("explorer");
  if (typeof config.example === "string" && config.example) {
    ui.text.value = config.example;
    explain(config.example);
  } else {
    ui.text.focus();
  }
})();
