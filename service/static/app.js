// Image classifier page: GET /models, then POST /topk and POST /explain for the chosen image.
// Same-origin requests only; no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), file: $("file"), drop: $("drop"), apikey: $("apikey"),
  status: $("status"), error: $("error"), results: $("results"),
  overlay: $("overlay"), caption: $("overlay-caption"), bars: $("bars"),
};
const state = { models: [], file: null, overlayUrl: null, run: 0 };

function selectedModel() {
  return state.models[Number(els.model.value)] || null;
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = els.apikey.value.trim();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

function query(params) {
  const m = selectedModel();
  const q = new URLSearchParams(params || {});
  if (m) { q.set("model", m.name); q.set("version", m.version); }
  return q.toString();
}

function setStatus(text) { els.status.textContent = text; }

function showError(text) {
  els.error.textContent = text;
  els.error.hidden = !text;
}

// The service answers every error as {"detail": "..."}; fall back to the status line.
async function errorMessage(response) {
  let detail = "";
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") detail = body.detail;
    else if (body && body.detail) detail = JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  const retry = response.headers.get("Retry-After");
  const suffix = retry ? ` (try again in ${retry} s)` : "";
  return `${response.status} ${response.statusText || "error"}: ${detail || "request failed"}${suffix}`;
}

async function call(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function modelText(m) {
  let text = `${m.name} v${m.version}`;
  if (m.default) text += " (default)";
  if (m.status !== "ready") text += ` (${m.status})`;
  return text;
}

async function loadModels() {
  try {
    const body = await (await call("/models", { headers: headers() })).json();
    state.models = body.models || [];
  } catch (err) {
    els.model.replaceChildren(new Option("No models", ""));
    showError(`Could not list models: ${err.message}`);
    return;
  }
  els.model.replaceChildren();
  let chosen = -1;
  state.models.forEach((m, i) => {
    const option = new Option(modelText(m), String(i));
    option.disabled = m.status !== "ready";
    if (m.status === "failed" && m.error) option.title = m.error;
    els.model.append(option);
    if (m.status === "ready" && (chosen < 0 || m.default)) chosen = i;
  });
  if (chosen < 0) {
    els.model.append(new Option("No model is ready", "", true, true));
    showError("No model is ready yet. Reload the page once the server has loaded one.");
    return;
  }
  els.model.value = String(chosen);
  els.model.disabled = false;
  setStatus("Choose an image.");
}

function fileBody() {
  const form = new FormData();
  form.append("file", state.file, state.file.name || "image");
  return form;
}

function renderBars(topk, explainedId) {
  els.bars.replaceChildren();
  for (const entry of topk) {
    const pct = entry.confidence * 100;
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "bar";
    button.dataset.classId = String(entry.class_id);
    button.setAttribute("aria-pressed", String(entry.class_id === explainedId));
    button.setAttribute("aria-label",
      `${entry.label}: ${pct.toFixed(1)} percent. Show its Grad-CAM map.`);
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = entry.label;
    label.title = entry.label;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.display = "block";
    fill.style.width = `${Math.max(0, Math.min(100, pct)).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${pct.toFixed(1)}%`;
    button.append(label, track, value);
    button.addEventListener("click", () => explain(entry, state.run));
    item.append(button);
    els.bars.append(item);
  }
}

function markExplained(classId) {
  for (const button of els.bars.querySelectorAll(".bar")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.classId) === classId));
  }
}

async function explain(entry, run) {
  const m = selectedModel();
  if (!m || !state.file) return;
  setStatus(`Computing Grad-CAM for ${entry.label}…`);
  const response = await call(`/explain?${query({ target: entry.label })}`, {
    method: "POST", body: fileBody(), headers: headers({ Accept: "image/png" }),
  }).catch((err) => { showError(err.message); setStatus(""); return null; });
  if (!response || run !== state.run) return;
  const blob = await response.blob();
  if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
  state.overlayUrl = URL.createObjectURL(blob);
  els.overlay.onload = () => {
    els.overlay.classList.toggle("small", els.overlay.naturalWidth < 128);
  };
  els.overlay.src = state.overlayUrl;
  els.overlay.alt = `Grad-CAM heatmap for class ${entry.label} over the uploaded image`;
  els.caption.textContent = `Grad-CAM: where ${m.name} v${m.version} looked for “${entry.label}”.`;
  markExplained(entry.class_id);
  showError("");
  setStatus("Done.");
}

async function classify() {
  const m = selectedModel();
  if (!state.file) return;
  if (!m || m.status !== "ready") { showError("Pick a model that is ready."); return; }
  const run = ++state.run;
  showError("");
  els.results.hidden = true;  // never show the previous image's results next to a new error
  setStatus(`Classifying ${state.file.name || "image"}…`);
  const k = Math.min(5, m.num_classes || 5);
  let body;
  try {
    const response = await call(`/topk?${query({ k })}`, {
      method: "POST", body: fileBody(), headers: headers({ Accept: "application/json" }),
    });
    body = await response.json();
  } catch (err) {
    if (run === state.run) { showError(err.message); setStatus(""); }
    return;
  }
  if (run !== state.run) return;
  const topk = body.predictions[0].topk;
  renderBars(topk, topk[0].class_id);
  els.results.hidden = false;
  await explain(topk[0], run);
}

function useFile(file) {
  if (!file) return;
  state.file = file;
  classify();
}

els.file.addEventListener("change", () => useFile(els.file.files[0]));
els.model.addEventListener("change", () => { if (state.file) classify(); });

for (const type of ["dragenter", "dragover"]) {
  els.drop.addEventListener(type, (event) => {
    event.preventDefault();
    els.drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  els.drop.addEventListener(type, () => els.drop.classList.remove("over"));
}
els.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) useFile(file);
});
// Dropping an image outside the zone must not navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

loadModels();
