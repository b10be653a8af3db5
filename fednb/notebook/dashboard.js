// The fednb live dashboard: an anywidget ESM drawn with plain DOM and SVG, no dependencies.
// The state arrives as traits (see dashboard.py); the one message sent back is {type: "stop"}.
// Stable hooks for tests: .fednb-dashboard, tr.fednb-party[data-party], svg.fednb-chart,
// circle.fednb-point[data-round] (global accuracy, one per round), button.fednb-stop,
// td.fednb-epsilon[data-party] with div.fednb-budget-fill (ε spent of the party's budget),
// div.fednb-warning[data-party] (a privacy warning), span.fednb-secure (secure aggregation's badge),
// div.fednb-population (a population of thousands: counts and rect.fednb-bar, the round's loss histogram).

const TRAITS = ["title", "strategy", "state", "round", "first_round", "last_round", "rounds_done",
  "started_at", "elapsed", "eta", "parties", "history", "error", "privacy", "warnings", "secure", "population"];
// A budget this nearly spent shows its bar in the warning colour.
const NEARLY_SPENT = 0.9;
const ROUND_STATUSES = new Set(["waiting", "training", "done", "late", "dropped"]);
// Tableau 10: distinguishable, and readable on light and dark backgrounds alike.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const METRICS = [
  { key: "accuracy", label: "accuracy", pointClass: "fednb-point" },
  { key: "loss", label: "loss", pointClass: "fednb-loss-point" },
];
const WIDTH = 720;
const HEIGHT = 250;
const MARGIN = { left: 44, right: 12, top: 22, bottom: 30 };
const GAP = 24;

let svgNs = null;

// The SVG namespace, read off a parsed <svg> so this file spells out no URL at all.
function svgNamespace() {
  if (svgNs === null) {
    const probe = document.createElement("div");
    probe.innerHTML = "<svg></svg>";
    svgNs = probe.firstChild.namespaceURI;
  }
  return svgNs;
}

function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function s(tag, attrs, text) {
  const node = document.createElementNS(svgNamespace(), tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function duration(seconds) {
  if (!isNumber(seconds)) return "—";
  const total = Math.max(0, seconds);
  if (total < 60) return `${total.toFixed(1)} s`;
  const whole = Math.round(total);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return hours > 0 ? `${hours}:${pad(minutes)}:${pad(whole % 60)}` : `${minutes}:${pad(whole % 60)}`;
}

function fixed(value, digits) {
  return isNumber(value) ? value.toFixed(digits) : "—";
}

// Three significant digits, without trailing zeros: 0.412, 3, 12.5.
function short(value) {
  return isNumber(value) ? String(Number(value.toPrecision(3))) : "?";
}

// A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `count` intervals.
function niceStep(span, count) {
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / magnitude;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * magnitude;
}

function decimals(step) {
  let digits = 0;
  while (digits < 6 && Math.abs(Math.round(step * 10 ** digits) - step * 10 ** digits) > 1e-6) digits += 1;
  return digits;
}

// The y axis: accuracy keeps [0, 1] while it fits, loss starts at 0 while it is positive;
// the ends snap to whole ticks so that every label is exact.
function yAxis(key, values) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (key === "accuracy" && low >= 0 && high <= 1) [low, high] = [0, 1];
  else if (low >= 0) low = 0;
  if (high - low < 1e-9) high = low + 1;
  const step = niceStep(high - low, 5);
  low = Math.floor(low / step + 1e-9) * step;
  high = Math.ceil(high / step - 1e-9) * step;
  const ticks = [];
  for (let value = low; value <= high + step / 2; value += step) ticks.push(value);
  return { low, high, ticks, digits: decimals(step) };
}

// An SVG path through the values aligned with rounds; a missing value (a dropped party) breaks it.
function pathOf(points) {
  let d = "";
  let drawing = false;
  for (const point of points) {
    if (point === null) {
      drawing = false;
      continue;
    }
    d += `${drawing ? "L" : "M"}${point[0].toFixed(1)},${point[1].toFixed(1)} `;
    drawing = true;
  }
  return d.trim();
}

function render({ model, el }) {
  const colors = new Map();
  const hidden = new Set();
  // When elapsed and eta last changed: between events the view counts on from there.
  let elapsedAt = performance.now();
  let etaAt = elapsedAt;
  let stopSent = false;

  const colorOf = (name) => {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
    return colors.get(name);
  };

  const root = h("div", "fednb-dashboard");
  const header = h("div", "fednb-header");
  const titleEl = h("span", "fednb-title");
  const strategyEl = h("span", "fednb-strategy");
  const stateEl = h("span", "fednb-state");
  const secureEl = h("span", "fednb-secure");
  secureEl.title = "secure aggregation: the coordinator saw only the sum of these parties' updates";
  const stopButton = h("button", "fednb-stop", "Stop");
  stopButton.type = "button";
  stopButton.title = "End training after the current round";
  header.append(titleEl, strategyEl, stateEl, secureEl, stopButton);

  const progress = h("div", "fednb-progress");
  const bar = h("div", "fednb-progress-bar");
  const fill = h("div", "fednb-progress-fill");
  bar.append(fill);
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  const progressText = h("div", "fednb-progress-text");
  progress.append(bar, progressText);

  const errorEl = h("div", "fednb-error");
  const warningsEl = h("div", "fednb-warnings");

  const table = h("table", "fednb-parties");
  const head = h("thead");
  const headRow = h("tr");
  for (const [label, tip] of [["party", ""], ["status", ""], ["examples", "training examples"],
    ["loss", "last reported training loss"], ["accuracy", "last reported training accuracy"],
    ["round time", "the party's training time in its last round"]]) {
    const th = h("th", "", label);
    if (tip) th.title = tip;
    headRow.append(th);
  }
  const epsilonHead = h("th", "fednb-epsilon-col", "ε / budget");
  epsilonHead.title = "the privacy budget ε each party's data has spent, of what its owner allows";
  headRow.append(epsilonHead);
  head.append(headRow);
  const body = h("tbody");
  table.append(head, body);

  const chartBox = h("div", "fednb-chart-box");
  const legend = h("div", "fednb-legend");
  const svg = s("svg", {
    class: "fednb-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": "global and per-party accuracy and loss per round",
  });
  chartBox.append(legend, svg);

  // A population of thousands is summarised: how many, how many this round sampled and how they
  // fared, and a histogram of the round's training losses, instead of one row per party.
  const populationEl = h("div", "fednb-population");
  populationEl.hidden = true;
  root.append(header, progress, errorEl, warningsEl, table, populationEl, chartBox);
  el.append(root);

  function drawHeader() {
    const state = model.get("state") || "idle";
    titleEl.textContent = model.get("title") || "fednb training";
    strategyEl.textContent = model.get("strategy") || "";
    stateEl.textContent = state;
    stateEl.className = `fednb-state fednb-state-${state}`;
    root.dataset.state = state;
    if (state !== "training") stopSent = false;
    stopButton.disabled = state !== "training" || stopSent;
    stopButton.textContent = state === "stopping" || stopSent ? "Stopping…" : "Stop";
    const error = model.get("error") || "";
    errorEl.textContent = error;
    errorEl.hidden = !error;
    const secure = model.get("secure") || "";
    secureEl.textContent = secure ? `secure · ${secure}` : "";
    secureEl.hidden = !secure;
    drawProgress();
  }

  function drawWarnings() {
    const warnings = model.get("warnings") || [];
    warningsEl.replaceChildren();
    warningsEl.hidden = warnings.length === 0;
    for (const warning of warnings) {
      const line = h("div", "fednb-warning");
      line.dataset.party = warning.party;
      const text = warning.message.includes(warning.party) ? warning.message : `${warning.party}: ${warning.message}`;
      line.textContent = `⚠ ${text}`;
      warningsEl.append(line);
    }
  }

  // A party's ε spent of its budget: the numbers and a bar, or "no budget".
  function budgetCell(name, privacy) {
    const td = h("td", "fednb-epsilon");
    td.dataset.party = name;
    const row = privacy[name];
    if (!row || !isNumber(row.budget)) {
      td.textContent = "no budget";
      td.classList.add("fednb-no-budget");
      return td;
    }
    const share = isNumber(row.spent) && row.budget > 0 ? Math.min(1, Math.max(0, row.spent / row.budget)) : 0;
    td.append(h("div", "fednb-budget-text", `${short(row.spent)} / ${short(row.budget)}`));
    const bar = h("div", "fednb-budget");
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(row.budget));
    bar.setAttribute("aria-valuenow", String(isNumber(row.spent) ? row.spent : 0));
    const fill = h("div", "fednb-budget-fill" + (share >= NEARLY_SPENT ? " fednb-budget-low" : ""));
    fill.style.width = `${(100 * share).toFixed(1)}%`;
    bar.append(fill);
    td.append(bar);
    td.title = `ε ${short(row.spent)} spent of ${short(row.budget)}, ${short(row.remaining)} left` +
      (isNumber(row.delta) ? ` (δ = ${row.delta.toExponential()})` : "") + `; ${row.charges} charge(s)`;
    return td;
  }

  function drawProgress() {
    const state = model.get("state") || "idle";
    const first = model.get("first_round") || 1;
    const last = model.get("last_round") || 0;
    const round = model.get("round") || 0;
    const done = model.get("rounds_done") || 0;
    const total = Math.max(last - first + 1, 0);
    const live = state === "training" || state === "stopping";
    const now = performance.now();
    const elapsed = (model.get("elapsed") || 0) + (live ? (now - elapsedAt) / 1000 : 0);
    const eta = model.get("eta");
    const etaLeft = isNumber(eta) ? Math.max(0, eta - (live ? (now - etaAt) / 1000 : 0)) : null;
    fill.style.width = `${total ? Math.min(100, (100 * done) / total) : 0}%`;
    bar.setAttribute("aria-valuemax", String(total));
    bar.setAttribute("aria-valuenow", String(done));
    const parts = [];
    if (state === "idle") {
      parts.push("waiting for training to start");
    } else {
      const span = first === 1 ? `${last}` : `${last} (rounds ${first}–${last} in this run)`;
      parts.push(live && round >= first ? `round ${round} / ${span}` : `${done} / ${total} rounds`);
      if (live) parts.push(`${done} done`);
      parts.push(`elapsed ${duration(elapsed)}`);
      if (live) parts.push(`ETA ${duration(etaLeft)}`);
    }
    progressText.textContent = parts.join(" · ");
  }

  function drawPopulation() {
    const summary = model.get("population") || {};
    const many = isNumber(summary.parties) && summary.parties > 0;
    populationEl.hidden = !many;
    table.hidden = many;
    if (!many) return;
    populationEl.replaceChildren();
    const counts = h("div", "fednb-population-counts");
    const facts = [[summary.parties, "parties"], [summary.available, "available"],
      [summary.sampled, `sampled in round ${summary.round}`], [summary.done, "done"], [summary.dropped, "dropped"]];
    for (const [value, label] of facts) {
      const fact = h("span", "fednb-fact");
      fact.append(h("b", "", isNumber(value) ? value.toLocaleString() : "—"), document.createTextNode(` ${label}`));
      counts.append(fact);
    }
    populationEl.append(counts);
    const losses = summary.losses || {};
    const bins = losses.counts || [];
    if (bins.length === 0) return;
    const width = 360, height = 90, pad = 18;
    const svg = s("svg", { class: "fednb-histogram", viewBox: `0 0 ${width} ${height + pad}`, role: "img" });
    const top = Math.max(...bins, 1);
    const step = width / bins.length;
    bins.forEach((count, i) => {
      const tall = (count / top) * height;
      const bar = s("rect", { class: "fednb-bar", x: i * step + 1, y: height - tall, width: step - 2, height: tall });
      bar.append(s("title", {}, `${count} parties: loss ${fixed(losses.edges[i], 3)} – ${fixed(losses.edges[i + 1], 3)}`));
      svg.append(bar);
    });
    svg.append(s("text", { x: 0, y: height + pad - 4, class: "fednb-axis" }, fixed(losses.edges[0], 3)));
    svg.append(s("text", { x: width, y: height + pad - 4, class: "fednb-axis", "text-anchor": "end" },
      fixed(losses.edges[losses.edges.length - 1], 3)));
    const caption = h("div", "fednb-population-caption",
      `training loss of this round's parties (median ${fixed(losses.median, 4)})`);
    populationEl.append(svg, caption);
  }

  function drawParties() {
    const rows = model.get("parties") || [];
    const privacy = model.get("privacy") || {};
    const withPrivacy = Object.keys(privacy).length > 0;
    epsilonHead.hidden = !withPrivacy;
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = h("tr", "fednb-empty");
      const td = h("td", "", "no parties yet");
      td.colSpan = withPrivacy ? 7 : 6;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const row of rows) {
      const tr = h("tr", "fednb-party");
      tr.dataset.party = row.name;
      tr.dataset.status = row.status;
      const name = h("td", "fednb-name");
      const swatch = h("span", "fednb-swatch");
      swatch.style.background = colorOf(row.name);
      name.append(swatch, document.createTextNode(row.name));
      const status = h("td", "fednb-status-cell");
      const known = ROUND_STATUSES.has(row.status);
      const badge = h("span", `fednb-badge fednb-status-${known ? row.status : "other"}`, row.status);
      status.append(badge);
      if (row.detail) {
        status.title = row.detail;
        status.append(h("div", "fednb-detail", row.detail));
      }
      const examples = h("td", "fednb-num", isNumber(row.examples) ? row.examples.toLocaleString() : "—");
      const loss = h("td", "fednb-num", fixed(row.loss, 4));
      const accuracy = h("td", "fednb-num", fixed(row.accuracy, 3));
      const seconds = h("td", "fednb-num", duration(row.seconds));
      tr.append(name, status, examples, loss, accuracy, seconds);
      if (withPrivacy) tr.append(budgetCell(row.name, privacy));
      body.append(tr);
    }
  }

  function partyNames(history) {
    const names = (model.get("parties") || []).map((row) => row.name);
    for (const entry of history) {
      for (const name of Object.keys(entry.parties || {})) if (!names.includes(name)) names.push(name);
    }
    return names;
  }

  // Rebuilt only when the parties change, so that a toggle keeps its focus.
  let legendKey = null;
  function drawLegend(names) {
    const key = JSON.stringify(names);
    if (key === legendKey) return;
    legendKey = key;
    legend.replaceChildren();
    const global = h("span", "fednb-legend-global");
    global.append(h("span", "fednb-line-swatch"), document.createTextNode("global"));
    legend.append(global);
    for (const name of names) {
      const label = h("label", "fednb-toggle");
      const box = h("input");
      box.type = "checkbox";
      box.checked = !hidden.has(name);
      box.setAttribute("data-party", name);
      box.addEventListener("change", () => {
        if (box.checked) hidden.delete(name);
        else hidden.add(name);
        drawPlot();
      });
      const swatch = h("span", "fednb-line-swatch fednb-line-party");
      swatch.style.borderColor = colorOf(name);
      label.append(box, swatch, document.createTextNode(name));
      legend.append(label);
    }
  }

  function drawPanel(metric, index, history, names) {
    const panelWidth = (WIDTH - GAP) / 2;
    const left = index * (panelWidth + GAP) + MARGIN.left;
    const right = index * (panelWidth + GAP) + panelWidth - MARGIN.right;
    const top = MARGIN.top;
    const bottom = HEIGHT - MARGIN.bottom;
    const group = s("g", { class: `fednb-panel fednb-panel-${metric.key}` });
    const evaluated = history.length > 0 && history.every((entry) => entry.evaluated);
    const which = history.length === 0 ? "" : evaluated ? " (test)" : history.some((e) => e.evaluated) ? "" : " (train)";
    group.append(s("text", { class: "fednb-panel-title", x: left, y: top - 8 }, metric.label + which));

    const shown = names.filter((name) => !hidden.has(name));
    const values = [];
    for (const entry of history) {
      if (isNumber(entry[metric.key])) values.push(entry[metric.key]);
      for (const name of shown) {
        const value = ((entry.parties || {})[name] || {})[metric.key];
        if (isNumber(value)) values.push(value);
      }
    }
    group.append(s("line", { class: "fednb-axis-line", x1: left, y1: bottom, x2: right, y2: bottom }));
    if (values.length === 0) {
      group.append(s("text", { class: "fednb-empty-chart", x: (left + right) / 2, y: (top + bottom) / 2,
        "text-anchor": "middle" }, history.length ? `no ${metric.label} reported` : "no rounds yet"));
      return group;
    }

    const first = model.get("first_round") || 1;
    const lastRound = history[history.length - 1].round;
    const x0 = Math.min(first, history[0].round);
    const x1 = Math.max(model.get("last_round") || 0, lastRound);
    const x = (round) => (x1 > x0 ? left + ((round - x0) / (x1 - x0)) * (right - left) : (left + right) / 2);
    const axis = yAxis(metric.key, values);
    const y = (value) => bottom - ((value - axis.low) / (axis.high - axis.low)) * (bottom - top);

    const grid = s("g", { class: "fednb-grid" });
    for (const value of axis.ticks) {
      grid.append(s("line", { x1: left, x2: right, y1: y(value), y2: y(value) }));
      grid.append(s("text", { class: "fednb-tick", x: left - 6, y: y(value) + 3, "text-anchor": "end" },
        value.toFixed(axis.digits)));
    }
    const step = Math.max(1, Math.ceil((x1 - x0) / 8));
    for (let round = x0; round <= x1; round += step) {
      grid.append(s("text", { class: "fednb-tick", x: x(round), y: bottom + 14, "text-anchor": "middle" }, String(round)));
    }
    grid.append(s("text", { class: "fednb-tick", x: right, y: bottom + 26, "text-anchor": "end" }, "round"));
    group.append(grid);

    for (const name of shown) {
      const color = colorOf(name);
      const points = history.map((entry) => {
        const value = ((entry.parties || {})[name] || {})[metric.key];
        return isNumber(value) ? [x(entry.round), y(value), entry.round, value] : null;
      });
      if (points.every((point) => point === null)) continue;
      const curve = s("g", { class: "fednb-party-series", "data-party": name });
      curve.append(s("path", { class: "fednb-curve fednb-party-curve", d: pathOf(points), style: `stroke: ${color}` }));
      for (const point of points) {
        if (point === null) continue;
        const dot = s("circle", { class: "fednb-party-point", cx: point[0].toFixed(1), cy: point[1].toFixed(1), r: 2,
          "data-party": name, "data-round": point[2], style: `fill: ${color}` });
        dot.append(s("title", {}, `${name}, round ${point[2]}: ${metric.label} ${point[3].toFixed(4)}`));
        curve.append(dot);
      }
      group.append(curve);
    }

    const points = history.map((entry) => (isNumber(entry[metric.key])
      ? [x(entry.round), y(entry[metric.key]), entry.round, entry[metric.key]] : null));
    const globalSeries = s("g", { class: "fednb-global-series", "data-metric": metric.key });
    globalSeries.append(s("path", { class: "fednb-curve fednb-global-curve", d: pathOf(points) }));
    for (const point of points) {
      if (point === null) continue;
      const dot = s("circle", { class: metric.pointClass, cx: point[0].toFixed(1), cy: point[1].toFixed(1), r: 3.5,
        "data-round": point[2] });
      dot.append(s("title", {}, `round ${point[2]}: ${metric.label} ${point[3].toFixed(4)}`));
      globalSeries.append(dot);
    }
    group.append(globalSeries);
    return group;
  }

  function drawPlot() {
    const history = model.get("history") || [];
    const names = partyNames(history);
    svg.replaceChildren(...METRICS.map((metric, index) => drawPanel(metric, index, history, names)));
  }

  function drawChart() {
    drawLegend(partyNames(model.get("history") || []));
    drawPlot();
  }

  function onStop() {
    if (stopButton.disabled) return;
    stopSent = true;
    model.send({ type: "stop" });
    drawHeader();
  }

  const handlers = {
    elapsed: () => { elapsedAt = performance.now(); },
    eta: () => { etaAt = performance.now(); },
    parties: () => { drawParties(); drawChart(); },
    privacy: drawParties,
    warnings: drawWarnings,
    history: drawChart,
    population: drawPopulation,
    first_round: () => { drawProgress(); drawChart(); },
    last_round: () => { drawProgress(); drawChart(); },
  };
  const listeners = TRAITS.map((name) => {
    const specific = handlers[name];
    const listener = () => {
      if (specific) specific();
      drawHeader();
    };
    model.on(`change:${name}`, listener);
    return [name, listener];
  });
  stopButton.addEventListener("click", onStop);
  // Between events the clock still runs: tick elapsed and ETA once a second.
  const timer = setInterval(drawProgress, 1000);

  drawParties();
  drawPopulation();
  drawWarnings();
  drawChart();
  drawHeader();

  return () => {
    clearInterval(timer);
    stopButton.removeEventListener("click", onStop);
    for (const [name, listener] of listeners) model.off(`change:${name}`, listener);
    root.remove();
  };
}

export default { render };
