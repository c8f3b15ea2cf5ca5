// The chat page: talks to this server's public API only (/v1/models, /v1/chat/completions streamed),
// keeps conversations in the browser's localStorage and the API key in sessionStorage, and never
// inserts model or user text as HTML (markdown.js builds nodes; grounding.js reads boxes).
import { renderMarkdown } from "./markdown.js";
import { findMarks } from "./grounding.js";

const STORE = "qwen3vl-onnx.conversations";
const KEY = "qwen3vl-onnx.api-key";
const MAX_SIDE = 1536; // pictures larger than this are scaled down before they are sent and kept
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];
const $ = (id) => document.getElementById(id);

let conversations = loadConversations();
let current = null;
let attachments = [];
let controller = null;
let model = null;

function loadConversations() {
  try { return JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { return []; }
}

function save() {
  try { localStorage.setItem(STORE, JSON.stringify(conversations)); } catch {
    showError("the browser's storage is full: this conversation is not kept (delete older ones)");
  }
}

function newConversation() {
  current = { id: String(Date.now()), title: "New chat", settings: { system: "", temperature: "", maxTokens: "" }, messages: [] };
  conversations.unshift(current);
  save();
  renderAll();
}

// ---- the API -------------------------------------------------------------------------------

async function api(path, init = {}, retried = false) {
  const headers = { ...(init.headers || {}) };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401 && !retried) {
    await askKey();
    return api(path, init, true);
  }
  return response;
}

function askKey() {
  const dialog = $("key-dialog");
  $("key").value = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => {
    sessionStorage.setItem(KEY, $("key").value.trim());
    resolve();
  }, { once: true }));
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return `${response.status} ${response.statusText}`; }
}

async function loadModel() {
  const response = await api("/v1/models");
  if (!response.ok) { showError(await errorText(response)); return; }
  model = (await response.json()).data[0].id;
  $("model-name").textContent = model;
}

function apiMessages(conv) {
  const out = conv.settings.system ? [{ role: "system", content: conv.settings.system }] : [];
  for (const m of conv.messages) {
    if (m.role === "user") {
      const parts = (m.media || []).map((p) => p.kind === "video"
        ? { type: "video_url", video_url: { url: p.url } } : { type: "image_url", image_url: { url: p.url } });
      out.push({ role: "user", content: parts.length ? [...parts, { type: "text", text: m.text }] : m.text });
    } else if (m.role === "assistant" && !m.failed) {
      out.push({ role: "assistant", content: m.text });
    }
  }
  return out;
}

async function send(text) {
  if (controller || (!text.trim() && !attachments.length)) return;
  if (!current) newConversation();
  const conv = current;
  conv.messages.push({ role: "user", text, media: attachments });
  if (conv.title === "New chat") conv.title = text.slice(0, 60) || "Pictures";
  attachments = [];
  renderAttachments();
  const answer = { role: "assistant", text: "", reasoning: "" };
  conv.messages.push(answer);
  save();
  renderAll();
  const history = apiMessages({ ...conv, messages: conv.messages.slice(0, -1) });  // all but the answer being written
  const body = { model, messages: history, stream: true, stream_options: { include_usage: true } };
  if (conv.settings.temperature !== "") body.temperature = Number(conv.settings.temperature);
  if (conv.settings.maxTokens !== "") body.max_tokens = Number(conv.settings.maxTokens);
  controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");  // SSE lines may end in CRLF
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const data = JSON.parse(line.slice(6));
          if (data.error) throw new Error(data.error.message);
          if (data.usage) answer.usage = data.usage;
          const delta = data.choices && data.choices[0] ? data.choices[0].delta : null;
          if (delta && (delta.content || delta.reasoning_content)) {
            first = first ?? performance.now();
            answer.text += delta.content || "";
            answer.reasoning += delta.reasoning_content || "";
            updateLast();
          }
        }
      }
    }
    const end = performance.now();
    const tokens = answer.usage ? answer.usage.completion_tokens : 0;
    answer.stats = { tokens, ttft: ((first ?? end) - start) / 1000,
      rate: first && end > first && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : null };
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else { answer.failed = true; answer.error = err.message; }
  } finally {
    controller = null;
    setBusy(false);
    save();
    renderAll();
  }
}

// ---- rendering -----------------------------------------------------------------------------

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pictureNode(p) {
  const box = el("div", "picture");
  const media = document.createElement(p.kind === "video" ? "video" : "img");
  media.src = p.url;
  if (p.kind === "video") media.controls = true;
  else media.alt = p.name || "attached picture";
  box.append(media);
  return box;
}

function drawMarks(pictureNodes, pictures, marks) {
  marks.forEach((m, k) => {
    const node = pictureNodes[m.picture];
    if (!node) return;
    let svg = node.querySelector("svg");
    if (!svg) {
      svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", `0 0 ${pictures[m.picture].w} ${pictures[m.picture].h}`);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("aria-hidden", "true");
      node.append(svg);
    }
    const colour = COLOURS[k % COLOURS.length];
    const ns = "http://www.w3.org/2000/svg";
    const shape = document.createElementNS(ns, m.kind === "box" ? "rect" : "circle");
    if (m.kind === "box") {
      const [x1, y1, x2, y2] = m.coords;
      Object.entries({ x: x1, y: y1, width: x2 - x1, height: y2 - y1 }).forEach(([a, v]) => shape.setAttribute(a, v));
    } else {
      shape.setAttribute("cx", m.coords[0]); shape.setAttribute("cy", m.coords[1]);
      shape.setAttribute("r", Math.max(4, pictures[m.picture].w / 60));
    }
    shape.setAttribute("stroke", colour);
    shape.dataset.label = m.label;
    svg.append(shape);
    if (m.label) {
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", m.coords[0]); label.setAttribute("y", Math.max(14, m.coords[1] - 4));
      label.setAttribute("fill", colour);
      label.textContent = m.label;
      svg.append(label);
    }
  });
}

function messageNode(m, index, conv) {
  const node = el("article", `msg ${m.failed ? "error" : m.role}`);
  node.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
  if (m.role === "user") {
    if (m.media && m.media.length) {
      const row = el("div", "media");
      m.media.forEach((p) => row.append(pictureNode(p)));
      node.append(row);
    }
    node.append(el("p", "", m.text));
    return node;
  }
  if (m.reasoning) {
    const details = el("details", "reasoning");
    details.append(el("summary", "", "Reasoning"), renderMarkdown(m.reasoning));
    node.append(details);
  }
  node.append(renderMarkdown(m.text));
  if (m.failed) node.append(el("p", "", `Error: ${m.error}`));
  if (m.stopped) node.append(el("p", "stats", "stopped"));
  if (m.stats) {
    const rate = m.stats.rate === null ? "" : ` · ${m.stats.rate.toFixed(1)} tok/s`;
    node.append(el("div", "stats", `${m.stats.tokens} tokens${rate} · first token ${m.stats.ttft.toFixed(2)} s`));
  }
  return node;
}

// The pictures an answer refers to: those of the user message it answers, else the last ones before it.
function picturesFor(conv, index) {
  for (let k = index - 1; k >= 0; k -= 1) {
    const m = conv.messages[k];
    const pictures = m.role === "user" ? (m.media || []).filter((p) => p.kind === "image") : [];
    if (pictures.length) return [k, pictures];
  }
  return [-1, []];
}

function renderAll() {
  const list = $("history");
  list.replaceChildren();
  for (const conv of conversations) {
    const item = el("li");
    const button = el("button", "", conv.title);
    button.type = "button";
    if (conv === current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => { current = conv; renderAll(); $("sidebar").classList.remove("open"); });
    item.append(button);
    list.append(item);
  }
  const box = $("messages");
  box.replaceChildren();
  if (!current) return;
  const nodes = current.messages.map((m, i) => messageNode(m, i, current));
  box.append(...nodes);
  current.messages.forEach((m, i) => {
    if (m.role !== "assistant" || !m.text) return;
    const [k, pictures] = picturesFor(current, i);
    if (k < 0) return;
    const marks = findMarks(m.text, pictures.map((p) => [p.w, p.h]));
    if (!marks.length) return;
    const pictureNodes = [...nodes[k].querySelectorAll(".picture")].filter((n) => n.querySelector("img"));
    drawMarks(pictureNodes, pictures, marks);
    const toggle = el("button", "toggle-marks", `Hide boxes (${marks.length})`);
    toggle.type = "button";
    toggle.addEventListener("click", () => {
      const hidden = pictureNodes[0].classList.toggle("hide-marks");
      pictureNodes.slice(1).forEach((n) => n.classList.toggle("hide-marks", hidden));
      toggle.textContent = `${hidden ? "Show" : "Hide"} boxes (${marks.length})`;
    });
    nodes[i].append(toggle);
  });
  box.scrollTop = box.scrollHeight;
}

function updateLast() {
  const box = $("messages");
  const last = box.lastElementChild;
  if (last) last.replaceWith(messageNode(current.messages.at(-1), current.messages.length - 1, current));
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  const box = $("messages");
  box.append(el("article", "msg error", `Error: ${text}`));
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---- attachments ---------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    const video = file.type.startsWith("video/");
    if (!video && !file.type.startsWith("image/")) { showError(`${file.name}: not a picture or a video`); continue; }
    let url = await readFile(file);
    let w = 0, h = 0;
    if (!video) {
      const img = new Image();
      img.src = url;
      await img.decode();
      [w, h] = [img.naturalWidth, img.naturalHeight];
      if (Math.max(w, h) > MAX_SIDE) {
        const f = MAX_SIDE / Math.max(w, h);
        const canvas = document.createElement("canvas");
        [canvas.width, canvas.height] = [Math.round(w * f), Math.round(h * f)];
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        url = canvas.toDataURL("image/jpeg", 0.92);
        [w, h] = [canvas.width, canvas.height];
      }
    }
    attachments.push({ kind: video ? "video" : "image", url, w, h, name: file.name });
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren(...attachments.map((p, k) => {
    const node = pictureNode(p);
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${p.name}`);
    remove.addEventListener("click", () => { attachments.splice(k, 1); renderAttachments(); });
    node.append(remove);
    return node;
  }));
}

// ---- wiring --------------------------------------------------------------------------------

function openSettings() {
  if (!current) newConversation();
  const s = current.settings;
  $("system").value = s.system; $("temperature").value = s.temperature; $("max-tokens").value = s.maxTokens;
  $("settings").showModal();
}

$("settings").addEventListener("close", () => {
  if (!current) return;
  current.settings = { system: $("system").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value };
  save();
});
$("open-settings").addEventListener("click", openSettings);
$("new-chat").addEventListener("click", newConversation);
$("toggle-sidebar").addEventListener("click", () => $("sidebar").classList.toggle("open"));
$("stop").addEventListener("click", () => controller && controller.abort());
$("file").addEventListener("change", (e) => { attach([...e.target.files]); e.target.value = ""; });
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("input").addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); attach(files); }
});
const composer = $("composer");
composer.addEventListener("dragover", (e) => { e.preventDefault(); composer.classList.add("drag"); });
composer.addEventListener("dragleave", () => composer.classList.remove("drag"));
composer.addEventListener("drop", (e) => { e.preventDefault(); composer.classList.remove("drag"); attach([...e.dataTransfer.files]); });

current = conversations[0] || null;
renderAll();
loadModel();
