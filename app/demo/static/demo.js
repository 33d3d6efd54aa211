// The flaskchat demo: one conversation, streamed through EventSource.
//
// EventSource cannot send an Authorization header, so each reply takes two steps: POST the
// conversation (with the key in the header) to demo/streams, which checks everything and
// answers with a single-use ticket; then open EventSource on demo/stream/<ticket>. The key
// lives in this tab's sessionStorage only and never goes into a URL. All URLs are relative,
// so the page also works under a path prefix behind a proxy.
"use strict";

const KEY_STORAGE = "flaskchat.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],        // the conversation sent with each request
  source: null,        // the open EventSource, while a reply streams
  reply: null,         // {bubble, text, meta, sentAt, firstAt, tokens, finished}
};

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  return headers;
}

function setStatus(text) { $("status").textContent = text; }

function showKeyPanel(show) {
  $("key-panel").hidden = !show;
  if (show) $("key").focus();
}

// An error envelope from the API, as a sentence a person can act on.
function describe(status, body) {
  const error = body && body.error ? body.error : null;
  const message = error && error.message ? error.message : "The server answered " + status + ".";
  if (status === 401) return "The API key was refused: " + message;
  if (status === 404 && error && error.code === "model_not_found") return "Unknown model: " + message;
  if (status === 429) return "The server is busy; try again in a moment. (" + message + ")";
  if (status >= 502) return "The model worker is unavailable: " + message;
  return message;
}

async function readJson(response) {
  try { return await response.json(); } catch (_) { return null; }
}

async function loadModels() {
  setStatus("Loading models…");
  let response;
  try {
    response = await fetch("v1/models", { headers: authHeaders() });
  } catch (err) {
    setStatus("Cannot reach the server: " + err.message);
    return;
  }
  const body = await readJson(response);
  if (response.status === 401) {
    showKeyPanel(true);
    setStatus(apiKey() ? describe(401, body) : "Enter an API key to start.");
    return;
  }
  if (!response.ok) {
    setStatus(describe(response.status, body));
    return;
  }
  showKeyPanel(false);
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of body.data || []) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.append(option);
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  setStatus(select.options.length ? "" : "No models are being served right now.");
}

function addBubble(role, text) {
  const bubble = document.createElement("div");
  bubble.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  bubble.append(body);
  $("conversation").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function setMeta(bubble, text) {
  let meta = bubble.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    bubble.append(meta);
  }
  meta.textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function replyStats(reply, note) {
  const parts = [];
  if (reply.firstAt !== null) parts.push("TTFT " + Math.round(reply.firstAt - reply.sentAt) + " ms");
  const end = reply.endAt !== null ? reply.endAt : performance.now();
  // The decode rate after the first token; a reply that came in one piece has none, and
  // then the whole time counts.
  let seconds = reply.firstAt !== null ? (end - reply.firstAt) / 1000 : 0;
  if (seconds < 0.05) seconds = (end - reply.sentAt) / 1000;
  if (reply.tokens !== null) {
    parts.push(reply.tokens + " tokens");
    if (seconds > 0) parts.push((reply.tokens / seconds).toFixed(1) + " tokens/s");
  }
  if (note) parts.push(note);
  return parts.join(" · ");
}

// Ends the current reply: closes the stream (which makes the server cancel generation),
// and keeps what arrived in the conversation.
function finishReply(note, error) {
  const reply = state.reply;
  if (!reply) return;
  state.reply = null;
  if (state.source) { state.source.close(); state.source = null; }
  reply.endAt = performance.now();
  if (reply.text) state.messages.push({ role: "assistant", content: reply.text });
  else state.messages.pop();  // never answered: the message is not part of the conversation
  if (error) {
    reply.bubble.classList.add("error");
    const text = reply.bubble.querySelector(".text");
    text.textContent = reply.text ? reply.text + "\n\n" + error : error;
  }
  setMeta(reply.bubble, replyStats(reply, note || (reply.reason === "length" ? "cut at max tokens" : "")));
  setBusy(false);
  setStatus("");
}

async function send(text) {
  const model = $("model").value;
  if (!model) { setStatus("Pick a model first."); return; }
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const reply = { bubble, text: "", sentAt: performance.now(), firstAt: null, endAt: null, tokens: null, reason: null };
  state.reply = reply;
  setBusy(true);
  setStatus("Waiting for the model…");

  const request = { model, messages: state.messages.slice() };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) request.temperature = temperature;

  let response;
  try {
    response = await fetch("demo/streams", { method: "POST", headers: authHeaders(), body: JSON.stringify(request) });
  } catch (err) {
    finishReply("", "Cannot reach the server: " + err.message);
    return;
  }
  const body = await readJson(response);
  if (!response.ok) {
    if (response.status === 401) showKeyPanel(true);
    finishReply("", describe(response.status, body));
    return;
  }
  if (state.reply !== reply) return;  // stopped while the ticket was on its way

  const source = new EventSource(body.url);
  state.source = source;
  source.onmessage = (event) => onEvent(reply, event.data);
  source.onerror = () => {
    // A finished stream was closed by us; anything else is a cut connection or a
    // ticket the server no longer knows. EventSource would retry: we do not.
    if (state.reply !== reply) return;
    finishReply("", reply.text ? "The connection was lost."
      : "The stream could not be opened (it expired or the server is busy); send the message again.");
  };
}

function onEvent(reply, data) {
  if (state.reply !== reply) return;
  if (data === "[DONE]") { finishReply(""); return; }
  let chunk;
  try { chunk = JSON.parse(data); } catch (_) { return; }
  if (chunk.error) {
    finishReply("", describe(chunk.error.code === "model_not_found" ? 404 : 502, chunk));
    return;
  }
  if (chunk.usage) reply.tokens = chunk.usage.completion_tokens;
  for (const choice of chunk.choices || []) {
    const piece = choice.delta && choice.delta.content;
    if (piece) {
      if (reply.firstAt === null) { reply.firstAt = performance.now(); setStatus("Streaming…"); }
      reply.text += piece;
      reply.bubble.querySelector(".text").textContent = reply.text;
      reply.bubble.scrollIntoView({ block: "end" });
    }
    if (choice.finish_reason) reply.reason = choice.finish_reason;
  }
}

function stop() {
  if (state.reply) finishReply("stopped");
}

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.reply) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    stop();
    state.messages = [];
    $("conversation").replaceChildren();
  });
  $("reload").addEventListener("click", loadModels);
  $("save-key").addEventListener("click", () => {
    sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
    $("key").value = "";
    loadModels();
  });
  $("key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") $("save-key").click();
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
