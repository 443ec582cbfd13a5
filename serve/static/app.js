// Genesis watch-and-try page: polls the run's status and curves, shows the tree, streams generations.
// Plain JavaScript with no dependencies, so the page works on a box without internet access.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2f6fdb", "#e07b00", "#2a9d55", "#c0392b", "#8e44ad", "#16a2b8", "#7f8c8d"];
const curves = { lastStep: -1, train: {}, val: {} };

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function showProblem(text) {
  $("problem").hidden = !text;
  $("problem").textContent = text || "";
}

// ---------------------------------------------------------------------------------------------------------
// Status

async function refreshStatus() {
  let s;
  try {
    s = await getJSON("/api/status");
  } catch (err) {
    showProblem(`The server did not answer (${err.message}); retrying.`);
    return;
  }
  $("run-name").textContent = s.run_dir;
  // A trainer that has not written for 5 minutes while "training" has probably died.
  const stale = s.state === "training" && s.seconds_since_update > 300;
  const state = stale ? "stale" : s.state;
  $("run-state").textContent = stale ? `no update for ${duration(s.seconds_since_update)}` : s.state;
  $("run-state").className = `badge ${state.replace(/\s+/g, "_")}`;
  showProblem(s.problem);
  const pct = s.progress === null ? 0 : s.progress * 100;
  $("progress-bar").style.width = `${pct.toFixed(1)}%`;
  $("progress-bar").dataset.progress = s.progress === null ? "" : s.progress.toFixed(4);
  $("progress-text").textContent = s.step === null || s.step === undefined ? "no steps yet"
    : `step ${s.step.toLocaleString()} of ${fmt(s.target_step)} (${pct.toFixed(1)}%)`;
  $("fig-loss").textContent = fmt(s.loss);
  $("fig-lr").textContent = fmt(s.lr, 3);
  $("fig-grad-norm").textContent = fmt(s.grad_norm, 3);
  $("fig-tokens-per-s").textContent = s.tokens_per_s ? Math.round(s.tokens_per_s).toLocaleString() : "—";
  $("fig-mfu").textContent = s.mfu ? `${(s.mfu * 100).toFixed(1)}%` : "—";
  $("fig-eta").textContent = duration(s.eta_s);
  $("fig-tokens-seen").textContent = s.tokens_seen ? s.tokens_seen.toLocaleString() : "—";
  $("fig-last-checkpoint").textContent = s.last_checkpoint || "none yet";
  $("fig-last-milestone").textContent = s.last_milestone || "none yet";
  showGpus(s.gpus || []);
  $("val-loss").textContent = s.val_loss
    ? "validation: " + Object.entries(s.val_loss).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") : "";
}

// Each rank's GPU at the last logged step (utilisation, memory, temperature, power); hidden without a GPU.
function showGpus(gpus) {
  const table = $("gpus");
  table.hidden = gpus.length === 0;
  const body = table.querySelector("tbody");
  body.replaceChildren(...gpus.map((g) => {
    const row = document.createElement("tr");
    row.dataset.rank = g.rank;
    const cells = [
      String(g.rank),
      g.utilization_pct === undefined ? "—" : `${Math.round(g.utilization_pct)}%`,
      g.memory_used_gib === undefined ? "—"
        : `${g.memory_used_gib.toFixed(1)}` + (g.memory_total_gib ? ` of ${g.memory_total_gib.toFixed(0)} GiB` : " GiB"),
      g.temperature_c === undefined ? "—" : `${Math.round(g.temperature_c)} °C`,
      g.power_w === undefined ? "—" : `${Math.round(g.power_w)} W`,
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    return row;
  }));
}

// ---------------------------------------------------------------------------------------------------------
// Curves: appended incrementally, drawn as SVG

async function refreshCurves() {
  let data;
  try {
    data = await getJSON(`/api/curves?since=${curves.lastStep}`);
  } catch (err) {
    return;
  }
  if (curves.generation !== undefined && data.generation !== curves.generation) {
    // A new run replaced the metrics file: drop the old points and fetch the new file from its start.
    curves.train = {}; curves.val = {}; curves.lastStep = -1; curves.generation = data.generation;
    return refreshCurves();
  }
  curves.generation = data.generation;
  for (const [key, points] of Object.entries(data.train)) (curves.train[key] ||= []).push(...points);
  for (const [key, points] of Object.entries(data.val)) (curves.val[key] ||= []).push(...points);
  curves.lastStep = data.last_step;
  const has = (curves.train.loss || []).length > 0;
  $("curves-empty").hidden = has;
  if (!has) return;
  const lossSeries = [{ name: "train", points: curves.train.loss, color: "#1d232a", width: 1 }];
  Object.keys(curves.val).sort().forEach((source, i) =>
    lossSeries.push({ name: `val ${source}`, points: curves.val[source], color: COLORS[i % COLORS.length], width: 2, dots: true }));
  drawChart($("chart-loss"), lossSeries);
  drawChart($("chart-lr"), [{ name: "lr", points: curves.train.lr || [], color: COLORS[0], width: 1.5 }]);
  drawChart($("chart-grad-norm"), [{ name: "grad norm", points: curves.train.grad_norm || [], color: COLORS[3], width: 1 }]);
  drawChart($("chart-tokens-per-s"), [{ name: "tokens/s", points: curves.train.tokens_per_s || [], color: COLORS[2], width: 1 }]);
}

function drawChart(svg, series) {
  const box = svg.getBoundingClientRect();
  const W = Math.max(box.width, 200), H = Math.max(box.height, 60);
  const pad = { l: 52, r: 8, t: 8, b: 18 };
  const all = series.flatMap((s) => s.points);
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!all.length) return;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.appendChild(el);
    return el;
  };
  const ticks = H > 150 ? 5 : 2;
  for (let i = 0; i <= ticks; i++) {
    const y = y0 + ((y1 - y0) * i) / ticks;
    add("line", { x1: pad.l, x2: W - pad.r, y1: Y(y), y2: Y(y), class: "axis" });
    add("text", { x: pad.l - 4, y: Y(y) + 3, "text-anchor": "end" }, fmt(y, 3));
  }
  add("text", { x: pad.l, y: H - 4 }, `step ${x0.toLocaleString()}`);
  add("text", { x: W - pad.r, y: H - 4, "text-anchor": "end" }, `${x1.toLocaleString()}`);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    add("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width, "data-series": s.name });
    if (s.dots) s.points.forEach((p) => add("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: s.color }));
    if (series.length > 1) {
      add("rect", { x: W - pad.r - 110, y: pad.t + i * 14, width: 10, height: 3, fill: s.color });
      add("text", { x: W - pad.r - 96, y: pad.t + i * 14 + 5 }, s.name);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Tree and model list

function li(parent, html) {
  const el = document.createElement("li");
  el.innerHTML = html;
  parent.appendChild(el);
  return el;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function evalLine(figures) {
  if (!figures) return "";
  const parts = [];
  if (figures.preference_accuracy !== null) parts.push(`pref acc ${fmt(figures.preference_accuracy, 3)}`);
  if (figures.format_adherence !== null) parts.push(`format ${fmt(figures.format_adherence, 3)}`);
  if (figures.hedging_score !== null) parts.push(`hedging ${fmt(figures.hedging_score, 3)}`);
  return parts.length ? ` <span class="eval">${parts.join(" · ")}</span>` : "";
}

async function refreshTree() {
  let tree;
  try {
    tree = await getJSON("/api/tree");
  } catch (err) {
    return;
  }
  const root = document.createElement("ul");
  const trunk = li(root, `<span class="node">trunk <b>${esc(tree.run_dir)}</b></span>`);
  const children = document.createElement("ul");
  trunk.appendChild(children);
  if (!tree.milestones.length) li(children, `<span class="muted">no milestones yet</span>`);
  for (const m of tree.milestones) {
    const node = li(children, `<span class="node" data-milestone="${m.step}">milestone step ${m.step.toLocaleString()}</span>`);
    if (!m.branch) continue;
    const branch = document.createElement("ul");
    node.appendChild(branch);
    const ev = m.branch.eval || {};
    for (const stage of ["sft", "dpo"]) {
      const state = m.branch[stage] ? "" : m.branch.in_progress ? " (training…)" : " (not yet)";
      li(branch, `<span class="node" data-branch="${m.step}-${stage}">${stage.toUpperCase()}${state}</span>${evalLine(ev[stage])}`);
    }
  }
  if (tree.checkpoints.length) {
    li(root, `<span class="muted">rolling checkpoints: ${tree.checkpoints.map((c) => parseInt(c.slice(5), 10)).join(", ")}</span>`);
  }
  if (tree.registry.length) {
    const reg = li(root, `<span class="node">MLflow registry</span>`);
    const list = document.createElement("ul");
    reg.appendChild(list);
    for (const v of tree.registry) {
      li(list, `${esc(v.name)} v${v.version}${v.step !== null ? ` · step ${v.step}` : ""}${v.parent ? ` · from ${esc(v.parent)}` : ""}`);
    }
  }
  if (tree.registry_problem) li(root, `<span class="muted">${esc(tree.registry_problem)}</span>`);
  $("tree").replaceChildren(root);
  $("tree").classList.remove("muted");
}

async function refreshModels() {
  let data;
  try {
    data = await getJSON("/api/models");
  } catch (err) {
    return;
  }
  const select = $("model-select");
  const chosen = select.value;
  const ids = data.models.map((m) => m.id);
  if (ids.join() !== Array.from(select.options).map((o) => o.value).join()) {
    select.replaceChildren(...data.models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.label;
      return option;
    }));
    // Default to the newest model (the list is ordered by step), keeping the visitor's choice if still there.
    select.value = ids.includes(chosen) ? chosen : ids[ids.length - 1] || "";
  }
  $("no-models").hidden = ids.length > 0;
  $("generate").disabled = ids.length === 0 || running !== null;
  $("max-new-tokens").max = data.limits.max_new_tokens;
}

// ---------------------------------------------------------------------------------------------------------
// Try it: POST, then read server-sent events from the response body as they arrive

let running = null;

async function generate(event) {
  event.preventDefault();
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {
    model: $("model-select").value, prompt: $("prompt").value, chat: $("chat").checked,
    system: $("system").value === "" ? null : $("system").value,
    max_new_tokens: num("max-new-tokens"), temperature: num("temperature"), top_k: num("top-k"),
    top_p: num("top-p"), seed: num("seed"),
  };
  const output = $("output"), status = $("gen-status");
  output.replaceChildren();
  if (!body.chat) {
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = body.prompt;
    output.appendChild(prompt);
  }
  const reply = document.createElement("span");
  reply.id = "reply";
  output.appendChild(reply);
  status.className = "muted";
  status.textContent = "waiting for the model…";
  running = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      throw new Error(response.status === 429 ? `busy: ${problem.error}` : problem.error);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const kind = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (kind === "start") status.textContent = `generating with ${data.model} (${data.prompt_tokens} prompt tokens)…`;
        else if (kind === "token") reply.textContent += data.text;
        else if (kind === "done") {
          status.textContent = `${data.tokens} tokens in ${data.seconds}s (${fmt(data.tokens_per_s, 3)} tokens/s), stopped: ${data.stopped}`;
          output.dataset.done = "1";
        } else if (kind === "error") throw new Error(data.error);
      }
    }
  } catch (err) {
    status.className = "muted error";
    status.textContent = err.name === "AbortError" ? "stopped" : err.message;
  } finally {
    running = null;
    $("generate").disabled = $("model-select").options.length === 0;
    $("stop").disabled = true;
  }
}

$("try-form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => running && running.abort());
window.addEventListener("resize", () => { curves.lastStep = -1; curves.train = {}; curves.val = {}; refreshCurves(); });

function every(ms, fn) {
  fn();
  setInterval(fn, ms);
}
every(2000, refreshStatus);
every(5000, refreshCurves);
every(10000, refreshTree);
every(10000, refreshModels);
