// The demo page: one model, or several side by side through /chat/fanout.
import { streamChat, streamFanout } from "./gateway-client.js";
import { renderMarkdown } from "./markdown.js";

const $ = (sel) => document.querySelector(sel);
const form = $("#chat-form");
const modelSelect = $("#model");
const compareBox = $("#compare");
const compareSet = $("#compare-models");
const compareList = $("#compare-list");
const compareNote = $("#compare-note");
const compareToggle = $("#compare-toggle");
const promptBox = $("#prompt");
const schemaBox = $("#schema");
const sendButton = $("#send");
const stopButton = $("#stop");
const formError = $("#form-error");
const output = $("#output");
const keyInput = $("#api-key");
const template = $("#panel-template");

let controller = null; // the AbortController of the request in flight
let panels = [];
// Models of the embedded provider: they run one generation at a time, across all of them.
let localIds = new Set();

// -- auth ------------------------------------------------------------------------------
keyInput.value = sessionStorage.getItem("gateway-key") || "";
keyInput.addEventListener("change", () => {
  sessionStorage.setItem("gateway-key", keyInput.value.trim());
  loadModels();
});
function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// -- models ----------------------------------------------------------------------------
async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
    const body = await res.json().catch(() => null);
    if (!res.ok) {
      const msg = body && body.error ? body.error.message : res.statusText;
      throw new Error(`HTTP ${res.status}: ${msg}`);
    }
    const listed = body.data || [];
    const ids = listed.map((m) => m.id);
    localIds = new Set(listed.filter((m) => m.owned_by === "local").map((m) => m.id));
    fillModels(ids);
    formError.textContent = "";
    document.body.dataset.ready = "true";
  } catch (err) {
    formError.textContent = `Could not load models: ${err.message}`;
    document.body.dataset.ready = "error";
  }
}

function fillModels(ids) {
  const previous = modelSelect.value;
  const option = (value, label) => {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = label;
    return opt;
  };
  // "" sends no model: the gateway's default (providers open to any model id are not listed).
  modelSelect.replaceChildren(option("", "gateway default"), ...ids.map((id) => option(id, id)));
  modelSelect.value = ids.includes(previous) ? previous : ids[0] || "";
  compareList.replaceChildren(
    ...ids.map((id) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = id;
      box.dataset.testid = "compare-model";
      label.append(box, " ", id);
      return label;
    }),
  );
  // Compare needs two listed models: say so rather than refuse after a click.
  const enough = ids.length >= 2;
  compareBox.disabled = !enough;
  compareToggle.title = enough ? "" : "Compare needs two models; /v1/models lists fewer.";
  if (!enough && compareBox.checked) {
    compareBox.checked = false;
    compareBox.dispatchEvent(new Event("change"));
  }
  updateCompareNote();
}

function updateCompareNote() {
  const local = compareChoice().filter((id) => localIds.has(id));
  compareNote.hidden = !compareBox.checked || local.length < 2;
}

function compareChoice() {
  return [...compareList.querySelectorAll("input:checked")].map((b) => b.value);
}

compareBox.addEventListener("change", () => {
  compareSet.hidden = !compareBox.checked;
  modelSelect.disabled = compareBox.checked;
  if (compareBox.checked && compareChoice().length < 2) {
    // Start from the picked model and the next one.
    const boxes = [...compareList.querySelectorAll("input")];
    const at = Math.max(0, boxes.findIndex((b) => b.value === modelSelect.value));
    for (const b of [boxes[at], boxes[(at + 1) % boxes.length]]) if (b) b.checked = true;
  }
  updateCompareNote();
});
compareList.addEventListener("change", updateCompareNote);

// -- panels ----------------------------------------------------------------------------
function makePanel(model, index) {
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.model = model || "";
  el.dataset.index = String(index);
  el.querySelector(".panel-model").textContent = model || "(default model)";
  const panel = {
    el,
    answer: el.querySelector(".answer"),
    status: el.querySelector(".status"),
    error: el.querySelector(".error"),
    stats: el.querySelector(".stats"),
    object: el.querySelector(".object"),
    text: "",
    frame: 0,
    stick: true, // follow the text while the reader is at the bottom
    ended: false,
  };
  panel.answer.addEventListener("scroll", () => {
    const a = panel.answer;
    panel.stick = a.scrollHeight - a.scrollTop - a.clientHeight < 8;
  });
  return panel;
}

function setStatus(panel, state, label = state) {
  panel.status.dataset.state = state;
  panel.status.textContent = label;
  panel.el.dataset.state = state;
  const busyStates = ["streaming", "waiting", "queued"];
  panel.answer.setAttribute("aria-busy", String(busyStates.includes(state)));
}

function showError(panel, message) {
  panel.error.hidden = false;
  panel.error.textContent = message;
}

function render(panel) {
  panel.frame = 0;
  panel.answer.innerHTML = renderMarkdown(panel.text);
  if (!panel.ended) {
    // The typing cursor, at the end of the last block.
    let last = panel.answer;
    while (last.lastElementChild && !["BR", "CODE"].includes(last.lastElementChild.tagName)) {
      last = last.lastElementChild;
    }
    if (last.tagName === "PRE") last = last.firstElementChild || last;
    const cursor = document.createElement("span");
    cursor.className = "cursor";
    cursor.setAttribute("aria-hidden", "true");
    last.append(cursor);
  }
  if (panel.stick) panel.answer.scrollTop = panel.answer.scrollHeight;
}

function scheduleRender(panel) {
  if (!panel.frame) panel.frame = requestAnimationFrame(() => render(panel));
}

function addText(panel, piece) {
  if (panel.ended) return;
  if (!panel.text && panel.status.dataset.state !== "streaming") setStatus(panel, "streaming");
  panel.text += piece;
  scheduleRender(panel);
}

function finishPanel(panel, end, error) {
  panel.ended = true;
  if (panel.frame) cancelAnimationFrame(panel.frame);
  render(panel);
  const reason = end ? end.finish_reason : "error";
  if (error) {
    const code = error.code ? ` (${error.code})` : "";
    showError(panel, `${error.message || "error"}${code}`);
  }
  if (reason === "stop" || reason === "tool_calls") setStatus(panel, "done");
  else if (reason === "length") setStatus(panel, "done", "done (length)");
  else if (reason === "timeout") {
    setStatus(panel, "timeout");
    if (panel.error.hidden) showError(panel, "The model timed out.");
  } else if (reason === "content_filter") setStatus(panel, "error", "content filtered");
  else if (reason === "cancelled") setStatus(panel, "cancelled");
  else {
    setStatus(panel, "error");
    if (panel.error.hidden) showError(panel, "The stream failed.");
  }
  if (end) panel.stats.replaceChildren(...statItems(end));
}

function statItems(end) {
  const items = [];
  const add = (name, value) => {
    const span = document.createElement("span");
    span.className = "stat";
    span.dataset.stat = name;
    span.textContent = value;
    items.push(span);
  };
  const out = end.usage ? end.usage.output_tokens : null;
  if (typeof end.ttft_ms === "number") add("ttft", `TTFT ${end.ttft_ms} ms`);
  if (typeof out === "number") add("tokens", `${out} token${out === 1 ? "" : "s"}`);
  if (typeof out === "number" && typeof end.duration_ms === "number") {
    // Generation speed: from the first token to the end (the whole duration if that is 0).
    const ms = end.duration_ms - (end.ttft_ms || 0) > 0 ? end.duration_ms - end.ttft_ms : 0;
    const total = ms || end.duration_ms;
    if (total > 0) add("rate", `${(out / (total / 1000)).toFixed(1)} tok/s`);
  }
  if (typeof end.duration_ms === "number") add("duration", `${end.duration_ms} ms total`);
  const by = end.answered_by || end.model;
  if (by) add("model", `${by}${end.provider ? ` via ${end.provider}` : ""}`);
  return items;
}

function failPanel(panel, err) {
  panel.ended = true;
  if (panel.frame) cancelAnimationFrame(panel.frame);
  render(panel);
  if (err && err.name === "AbortError") {
    setStatus(panel, "cancelled");
    return;
  }
  if (err && err.status === 504) setStatus(panel, "timeout");
  else setStatus(panel, "error");
  showError(panel, (err && err.message) || String(err));
}

// -- sending ---------------------------------------------------------------------------
function busy(on) {
  sendButton.disabled = on;
  stopButton.disabled = !on;
  document.body.dataset.busy = on ? "true" : "false";
}

// Structured output: the object as it fills in (partial), then checked (object).
function showObject(panel, ev) {
  if (ev.event !== "partial" && ev.event !== "object") return;
  panel.object.hidden = false;
  panel.object.dataset.state = ev.event === "object" ? "complete" : "partial";
  panel.object.textContent = JSON.stringify(ev.data.object, null, 2);
}

// The schema box's JSON as a response_format; null when empty, undefined when invalid.
function responseFormat() {
  const raw = schemaBox.value.trim();
  if (!raw) return null;
  try {
    const schema = JSON.parse(raw);
    return { type: "json_schema", json_schema: { name: "answer", schema } };
  } catch {
    return undefined;
  }
}

async function send() {
  const prompt = promptBox.value.trim();
  formError.textContent = "";
  if (!prompt) {
    formError.textContent = "Write a prompt first.";
    return;
  }
  const format = responseFormat();
  if (format === undefined) {
    formError.textContent = "The JSON schema is not valid JSON.";
    return;
  }
  const compare = compareBox.checked;
  const models = compare ? compareChoice() : [modelSelect.value];
  if (compare && models.length < 2) {
    formError.textContent = "Pick at least two models to compare.";
    return;
  }
  controller = new AbortController();
  const { signal } = controller;
  panels = models.map(makePanel);
  output.classList.toggle("compare", compare);
  output.replaceChildren(...panels.map((p) => p.el));
  for (const p of panels) setStatus(p, "waiting", "waiting…");
  busy(true);
  try {
    if (compare) {
      await runFanout(prompt, models, signal, format);
    } else {
      await runSingle(prompt, models[0], signal, format);
    }
  } finally {
    busy(false);
    controller = null;
  }
}

async function runSingle(prompt, model, signal, format) {
  const panel = panels[0];
  const body = { prompt };
  if (model) body.model = model;
  if (format) body.response_format = format;
  try {
    const { end, error } = await streamChat(body, {
      signal,
      headers: authHeaders(),
      onToken: (piece) => addText(panel, piece),
      onEvent: (ev) => {
        if (ev.event === "start") setStatus(panel, "streaming");
        showObject(panel, ev);
      },
    });
    finishPanel(panel, end, error);
  } catch (err) {
    failPanel(panel, err);
  }
}

// A local model waits while another local one generates: show it on its panel until
// its own first token (its start comes with that token).
function queueBehind(running) {
  for (const p of panels) {
    if (p === running || p.ended || p.text || !localIds.has(p.el.dataset.model)) continue;
    if (p.status.dataset.state !== "waiting") continue;
    setStatus(p, "queued", "waiting for the model…");
    const note = document.createElement("p");
    note.className = "queued-note";
    note.dataset.testid = "queued-note";
    note.textContent =
      `Waiting for ${running.el.dataset.model} to finish: ` +
      "local models answer one after the other.";
    p.answer.replaceChildren(note);
  }
}

async function runFanout(prompt, models, signal, format) {
  const body = { prompt, models };
  if (format) body.response_format = format;
  try {
    const { results } = await streamFanout(
      body,
      {
        signal,
        headers: authHeaders(),
        onToken: (index, piece) => panels[index] && addText(panels[index], piece),
        onEvent: (ev) => {
          const panel = ev.data && panels[ev.data.index];
          if (!panel) return;
          if (ev.event === "start") {
            setStatus(panel, "streaming");
            if (localIds.has(panel.el.dataset.model)) queueBehind(panel);
          } else if (ev.event === "end") finishPanel(panel, ev.data, null);
          else if (ev.event === "partial" || ev.event === "object") showObject(panel, ev);
          else if (ev.event === "error") {
            const e = ev.data.error || {};
            showError(panel, `${e.message || "error"}${e.code ? ` (${e.code})` : ""}`);
          }
        },
      },
    );
    results.forEach((r, i) => {
      if (!panels[i].ended) finishPanel(panels[i], r.end, r.error);
    });
  } catch (err) {
    for (const p of panels) if (!p.ended) failPanel(p, err);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (!controller) send();
});
promptBox.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => {
  if (controller) controller.abort();
});

loadModels();
