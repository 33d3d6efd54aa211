// The flaskchat admin page: keys (with their limits, share and status), create, change the
// share of (weight and service tiers) and revoke, and a chart of tokens per day per team
// for the last 30 days. Everything comes from the admin
// API under admin/v1 with the admin key in the Authorization header. The key lives in this
// tab's sessionStorage only and never goes into a URL. All URLs are relative, so the page
// also works under a path prefix behind a proxy.
"use strict";

const KEY_STORAGE = "flaskchat.adminKey";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f6feb", "#e8710a", "#1a7f37", "#a371f7", "#d1242f", "#0598bc", "#bf8700",
                "#6e7781", "#cf3d9e", "#57606a"];
const $ = (id) => document.getElementById(id);

function adminKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

function showKeyPanel(show) {
  $("key-panel").hidden = !show;
  $("content").hidden = show;
  $("forget-key").hidden = show;
  if (show) $("admin-key").focus();
}

class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : null;
    super(error && error.message ? error.message : "The server answered " + status + ".");
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + adminKey() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch("admin/v1/" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let parsed = null;
  try { parsed = await response.json(); } catch (_) { /* an empty or non-JSON body */ }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (className) td.className = className;
  row.append(td);
  return td;
}

function renderQueues(servers) {
  const body = $("queues").querySelector("tbody");
  body.replaceChildren();
  for (const server of servers) {
    const row = document.createElement("tr");
    cell(row, server.model);
    cell(row, server.server);
    cell(row, server.capacity, "number");
    cell(row, server.in_flight, "number");
    cell(row, server.waiting.map((w) => `${w.tenant} (${w.tier}): ${w.requests}`).join(", ")
      || "none");
    body.append(row);
  }
}

function renderKeys(keys) {
  const body = $("keys").querySelector("tbody");
  body.replaceChildren();
  for (const key of keys) {
    const row = document.createElement("tr");
    row.dataset.name = key.name;
    cell(row, key.name).title = "id " + key.id + ", " + key.hint;
    cell(row, key.team);
    cell(row, key.models ? key.models.join(", ") : "all");
    cell(row, key.rpm);
    cell(row, key.tpm);
    cell(row, key.max_parallel);
    cell(row, key.budget_tokens ? key.budget_tokens + " / " + key.budget_period : null);
    cell(row, key.weight, "weight");
    cell(row, key.max_tier, "max-tier");
    // Unset: the server picks (flex for a key whose max tier is flex, else default).
    cell(row, key.default_tier || "auto", "default-tier");
    cell(row, key.expires_at ? key.expires_at.slice(0, 16).replace("T", " ") : "never");
    cell(row, key.status, "status status-" + key.status);
    const actions = cell(row, "");
    if (key.status === "active") {
      const edit = document.createElement("button");
      edit.type = "button";
      edit.className = "edit";
      edit.textContent = "Edit";
      edit.addEventListener("click", () => startEdit(key));
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "danger revoke";
      revoke.textContent = "Revoke";
      revoke.addEventListener("click", () => revokeKey(key));
      actions.replaceChildren(edit, revoke);
    }
    body.append(row);
  }
}

function svg(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [attribute, value] of Object.entries(attributes)) element.setAttribute(attribute, value);
  if (parent) parent.append(element);
  return element;
}

function shortNumber(value) {
  if (value >= 1e9) return (value / 1e9).toFixed(1) + "G";
  if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(1) + "k";
  return String(value);
}

// Stacked bars: one bar per day, one colour per team.
function renderChart(daily) {
  const days = daily.days;
  const teams = Object.keys(daily.teams);
  const width = 900, height = 260, left = 52, bottom = 28, top = 10, right = 10;
  const totals = days.map((_, i) => teams.reduce((sum, t) => sum + daily.teams[t][i], 0));
  const max = Math.max(1, ...totals);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "presentation" });
  const plotHeight = height - top - bottom;
  const step = (width - left - right) / days.length;
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotHeight * (1 - fraction);
    svg("line", { x1: left, x2: width - right, y1: y, y2: y, stroke: "#e1e5ea" }, chart);
    svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6672" },
        chart).textContent = shortNumber(Math.round(max * fraction));
  }
  days.forEach((day, i) => {
    let y = top + plotHeight;
    teams.forEach((team, t) => {
      const tokens = daily.teams[team][i];
      if (!tokens) return;
      const h = plotHeight * tokens / max;
      y -= h;
      const bar = svg("rect", { x: left + i * step + 1, y, width: Math.max(1, step - 2), height: h,
                                fill: COLORS[t % COLORS.length], class: "bar" }, chart);
      bar.dataset.team = team;
      bar.dataset.day = day;
      bar.dataset.tokens = tokens;
      svg("title", {}, bar).textContent = `${day} · ${team}: ${tokens} tokens`;
    });
    if (i % 5 === days.length % 5 || i === days.length - 1) {
      svg("text", { x: left + i * step + step / 2, y: height - 8, "text-anchor": "middle",
                    "font-size": 11, fill: "#5b6672" }, chart).textContent = day.slice(5);
    }
  });
  $("chart").replaceChildren(chart);
  $("chart-range").textContent = days.length ? `(${days[0]} to ${days[days.length - 1]})` : "";
  const legend = $("legend");
  legend.replaceChildren();
  teams.forEach((team, t) => {
    const item = document.createElement("li");
    const swatch = svg("svg", { width: 12, height: 12, class: "swatch" });
    svg("rect", { width: 12, height: 12, rx: 2, fill: COLORS[t % COLORS.length] }, swatch);
    const total = daily.teams[team].reduce((a, b) => a + b, 0);
    item.append(swatch, ` ${team}: ${shortNumber(total)} tokens`);
    legend.append(item);
  });
  if (!teams.length) {
    const item = document.createElement("li");
    item.textContent = "No tokens used in these 30 days.";
    legend.append(item);
  }
}

async function load() {
  if (!adminKey()) {
    showKeyPanel(true);
    setStatus("Enter an admin key to start.");
    return;
  }
  setStatus("Loading…");
  try {
    const [keys, daily, queues] = await Promise.all([
      api("GET", "keys"), api("GET", "usage/daily?days=30"), api("GET", "queues")]);
    showKeyPanel(false);
    renderKeys(keys.data);
    renderQueues(queues.data);
    renderChart(daily);
    setStatus(`${keys.data.length} keys.`);
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      showKeyPanel(true);
      setStatus("The admin key was refused: " + err.message, true);
    } else {
      setStatus(err.message, true);
    }
  }
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value ? Number(value) : null;
}

async function createKey(event) {
  event.preventDefault();
  const body = { name: $("new-name").value.trim() };
  const team = $("new-team").value.trim();
  if (team) body.team = team;
  const models = $("new-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  for (const [field, id] of [["rpm", "new-rpm"], ["tpm", "new-tpm"],
                             ["max_parallel", "new-parallel"], ["budget_tokens", "new-budget"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  if (body.budget_tokens) body.budget_period = $("new-period").value;
  const weight = numberOrNull("new-weight");
  if (weight !== null) body.weight = weight;
  body.max_tier = $("new-max-tier").value;
  if ($("new-default-tier").value) body.default_tier = $("new-default-tier").value;
  const expires = $("new-expires").value.trim();
  if (expires) body.expires_in = expires;
  try {
    const made = await api("POST", "keys", body);
    $("secret").textContent = made.secret;
    $("secret-panel").hidden = false;
    $("create").reset();
    await load();
    setStatus(`Key "${made.name}" created.`);
  } catch (err) {
    setStatus("The key was not created: " + err.message, true);
  }
}

// The weight and tiers of one key, changed in the form above the table (the server checks
// them: a default tier above the max tier is refused with its reason).
let editing = null;

function startEdit(key) {
  editing = key;
  $("edit-name").textContent = key.name;
  $("edit-weight").value = key.weight;
  $("edit-max-tier").value = key.max_tier;
  $("edit-default-tier").value = key.default_tier || "";
  $("edit-panel").hidden = false;
  $("edit-weight").focus();
}

function stopEdit() {
  editing = null;
  $("edit-panel").hidden = true;
}

async function saveEdit(event) {
  event.preventDefault();
  if (!editing) return;
  const key = editing;
  const body = {
    weight: numberOrNull("edit-weight"),
    max_tier: $("edit-max-tier").value,
    default_tier: $("edit-default-tier").value || null,
  };
  try {
    await api("PATCH", "keys/" + encodeURIComponent(key.id), body);
    stopEdit();
    await load();
    setStatus(`Key "${key.name}" changed.`);
  } catch (err) {
    setStatus("The key was not changed: " + err.message, true);
  }
}

async function revokeKey(key) {
  if (!window.confirm(`Revoke the key "${key.name}"? Every request with it is refused within seconds.`)) return;
  try {
    await api("DELETE", "keys/" + encodeURIComponent(key.id));
    await load();
    setStatus(`Key "${key.name}" revoked.`);
  } catch (err) {
    setStatus("The key was not revoked: " + err.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("save-key").addEventListener("click", () => {
    sessionStorage.setItem(KEY_STORAGE, $("admin-key").value.trim());
    $("admin-key").value = "";
    load();
  });
  $("admin-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") $("save-key").click();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyPanel(true);
    setStatus("The admin key was forgotten.");
  });
  $("refresh").addEventListener("click", load);
  $("create").addEventListener("submit", createKey);
  $("edit").addEventListener("submit", saveEdit);
  $("cancel-edit").addEventListener("click", stopEdit);
  $("copy-secret").addEventListener("click", () => {
    if (navigator.clipboard) navigator.clipboard.writeText($("secret").textContent);
  });
  $("hide-secret").addEventListener("click", () => {
    $("secret").textContent = "";
    $("secret-panel").hidden = true;
  });
  load();
});
