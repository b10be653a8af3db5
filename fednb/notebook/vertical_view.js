// The fednb view of vertical training: an anywidget ESM drawn with plain DOM and SVG, no dependencies.
// The state arrives as traits (see vertical_view.py); nothing is sent back. It reuses dashboard.css.
// Stable hooks for tests: .fednb-vertical[data-mode], tr.fednb-party[data-party] with span.fednb-role[data-role],
// svg.fednb-chart with circle.fednb-loss-point[data-model][data-epoch] (logistic) or circle.fednb-tree-point and
// circle.fednb-metric-point[data-tree] (boosting), svg.fednb-importance with rect.fednb-importance-bar[data-party]
// [data-feature], div.fednb-metrics.

const TRAITS = ["mode", "title", "detail", "state", "parties", "aligned", "split", "epochs", "labels", "models",
  "trees", "depth", "position", "rounds", "importance", "metrics", "note", "elapsed", "error"];
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const METRICS = [["auc", "AUC"], ["accuracy", "accuracy"], ["ks", "KS"], ["logloss", "log-loss"], ["mse", "MSE"],
  ["r2", "R²"]];
// The test metric a boosting curve follows: the first of these the objective has (as curve_metric in Python).
const CURVE_METRICS = [["auc", "AUC"], ["accuracy", "accuracy"], ["r2", "R²"]];
const IMPORTANCE_SHOWN = 20;
const WIDTH = 720;
const HEIGHT = 200;
const MARGIN = { left: 44, right: 12, top: 14, bottom: 28 };

let svgNs = null;

// An empty chart: the svg and its two axes, inside the margins (``rightMargin`` on the right).
function chartFrame(label, rightMargin) {
  const svg = s("svg", { class: "fednb-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": label });
  const left = MARGIN.left;
  const right = WIDTH - rightMargin;
  const top = MARGIN.top;
  const bottom = HEIGHT - MARGIN.bottom;
  svg.append(s("line", { class: "fednb-axis-line", x1: left, y1: bottom, x2: right, y2: bottom }),
    s("line", { class: "fednb-axis-line", x1: left, y1: top, x2: left, y2: bottom }));
  return { svg, left, right, top, bottom };
}

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

function fixed(value, digits) {
  return isNumber(value) ? value.toFixed(digits) : "—";
}

function progressText(state) {
  const done = state.models.reduce((sum, m) => sum + m.history.length, 0);
  const total = state.epochs * Math.max(state.labels.length, 1);
  const parts = [total ? `${done}/${total} epochs` : `${done} epochs`];
  const current = state.models[state.models.length - 1];
  if (current && state.labels.length > 1) parts.push(`${current.label} (${state.models.length} of ${state.labels.length})`);
  const last = current && current.history[current.history.length - 1];
  if (last) parts.push(`epoch ${last.epoch}: loss ${fixed(last.loss, 4)}` +
                       (isNumber(last.auc) ? `, test AUC ${fixed(last.auc, 4)}` : "") + `, ${fixed(last.seconds, 1)} s`);
  parts.push(`elapsed ${fixed(state.elapsed, 1)} s`);
  return { text: parts.join(" · "), fraction: total ? Math.min(done / total, 1) : 0 };
}

function partiesTable(state) {
  const table = h("table", "fednb-parties");
  const head = h("tr");
  for (const name of ["party", "role", "table rows", "aligned rows"]) head.append(h("th", "", name));
  table.append(head);
  for (const party of state.parties) {
    const row = h("tr", "fednb-party");
    row.dataset.party = party.name;
    const role = h("span", `fednb-badge fednb-role fednb-status-${party.role === "label" ? "done" : "training"}`,
      party.role === "label" ? "label + features" : party.role);
    role.dataset.role = party.role;
    const cells = [h("td", "", party.name), h("td"), h("td", "fednb-num", String(party.rows || "")),
      h("td", "fednb-num", String(state.aligned || ""))];
    cells[1].append(role);
    row.append(...cells);
    table.append(row);
  }
  return table;
}

// The loss per epoch of each model (one per class for one-vs-rest), or a note while there is none.
function lossChart(state) {
  const points = state.models.flatMap((m) => m.history.filter((e) => isNumber(e.loss)));
  const { svg, left, right, top, bottom } = chartFrame("loss per epoch", MARGIN.right);
  if (points.length === 0) {
    const text = state.models.length ? "no loss reported" : "waiting for the first epoch";
    svg.append(s("text", { class: "fednb-empty-chart", x: (left + right) / 2, y: (top + bottom) / 2,
      "text-anchor": "middle" }, text));
    return svg;
  }
  const epochs = Math.max(state.epochs, ...points.map((p) => p.epoch), 2);
  const high = Math.max(...points.map((p) => p.loss)) * 1.05 || 1;
  const x = (epoch) => left + ((epoch - 1) / (epochs - 1)) * (right - left);
  const y = (loss) => bottom - (loss / high) * (bottom - top);
  svg.append(s("text", { class: "fednb-tick", x: left - 6, y: bottom + 4, "text-anchor": "end" }, "0"),
    s("text", { class: "fednb-tick", x: left - 6, y: top + 4, "text-anchor": "end" }, high.toPrecision(2)),
    s("text", { class: "fednb-tick", x: left, y: bottom + 16, "text-anchor": "middle" }, "1"),
    s("text", { class: "fednb-tick", x: right, y: bottom + 16, "text-anchor": "middle" }, String(epochs)),
    s("text", { class: "fednb-tick", x: (left + right) / 2, y: bottom + 24, "text-anchor": "middle" }, "epoch"),
    s("text", { class: "fednb-panel-title", x: left + 8, y: top + 2 }, "loss (Taylor, training rows)"));
  state.models.forEach((model, index) => {
    const color = PALETTE[index % PALETTE.length];
    const shown = model.history.filter((e) => isNumber(e.loss));
    const d = shown.map((e, i) => `${i ? "L" : "M"}${x(e.epoch).toFixed(1)},${y(e.loss).toFixed(1)}`).join(" ");
    svg.append(s("path", { class: "fednb-curve", d, stroke: color, "stroke-width": 2 }));
    for (const e of shown) {
      const point = s("circle", { class: "fednb-loss-point", cx: x(e.epoch).toFixed(1), cy: y(e.loss).toFixed(1),
        r: 2.5, style: `fill: ${color}`, "data-model": model.label || "model", "data-epoch": e.epoch });
      point.append(s("title", {}, `${model.label ? model.label + ", " : ""}epoch ${e.epoch}: loss ${fixed(e.loss, 4)}, `
        + `${fixed(e.seconds, 2)} s`));
      svg.append(point);
    }
    if (model.label) {
      svg.append(s("text", { class: "fednb-tick", x: right - 4, y: top + 12 + 12 * index, "text-anchor": "end",
        style: `fill: ${color}` }, model.label));
    }
  });
  return svg;
}

// Boosting's progress: trees done, the tree and level growing now, the last tree's loss and test metric.
function treeProgress(state) {
  const done = state.rounds.length;
  const at = state.position || {};
  const parts = [state.trees ? `${done}/${state.trees} trees` : `${done} trees`];
  let fraction = state.trees ? done / state.trees : 0;
  if (state.state === "training" && at.tree > done) {
    parts.push(`tree ${at.tree}/${state.trees}, level ${at.level}/${state.depth}`);
    if (state.trees && state.depth) fraction = (done + (at.level - 1) / state.depth) / state.trees;
  }
  const last = state.rounds[done - 1];
  const metric = curveMetric(state);
  if (last) parts.push(`tree ${last.tree}: loss ${fixed(last.loss, 4)}` +
                       (metric ? `, test ${metric[1]} ${fixed(last[metric[0]], 4)}` : "") + `, ${fixed(last.seconds, 1)} s`);
  parts.push(`elapsed ${fixed(state.elapsed, 1)} s`);
  return { text: parts.join(" · "), fraction: Math.min(Math.max(fraction, 0), 1) };
}

// A gain as the text summary writes it: four significant digits, no trailing zeros.
function gainText(gain) {
  return String(Number(gain.toPrecision(4)));
}

function curveMetric(state) {
  return CURVE_METRICS.find(([key]) => state.rounds.some((r) => isNumber(r[key]))) || null;
}

// Per tree: the training loss (left axis, solid) and the test metric (right axis, dashed).
function treeChart(state) {
  // as wide a margin on the right as on the left: the test metric's axis is there
  const { svg, left, right, top, bottom } = chartFrame("training loss and test metric per tree", MARGIN.left);
  const losses = state.rounds.filter((r) => isNumber(r.loss));
  if (state.rounds.length === 0) {
    svg.append(s("text", { class: "fednb-empty-chart", x: (left + right) / 2, y: (top + bottom) / 2,
      "text-anchor": "middle" }, "waiting for the first tree"));
    return svg;
  }
  const trees = Math.max(state.trees, ...state.rounds.map((r) => r.tree), 2);
  const high = Math.max(...losses.map((r) => r.loss), 0) * 1.05 || 1;
  const metric = curveMetric(state);
  const scored = metric ? state.rounds.filter((r) => isNumber(r[metric[0]])) : [];
  // the metric's axis: from just below its lowest value to just above its highest, in steps of 0.05, at most 1
  const values = scored.map((r) => r[metric[0]]);
  const metricLow = values.length ? Math.floor((Math.min(...values) - 0.02) * 20) / 20 : 0;
  const metricHigh = values.length ? Math.min(Math.ceil((Math.max(...values) + 0.02) * 20) / 20, 1) : 1;
  const x = (tree) => left + ((tree - 1) / (trees - 1)) * (right - left);
  const yLoss = (loss) => bottom - (loss / high) * (bottom - top);
  const yMetric = (value) => bottom - ((value - metricLow) / (metricHigh - metricLow || 1)) * (bottom - top);
  svg.append(s("text", { class: "fednb-tick", x: left - 6, y: bottom + 4, "text-anchor": "end" }, "0"),
    s("text", { class: "fednb-tick", x: left - 6, y: top + 4, "text-anchor": "end" }, high.toPrecision(2)),
    s("text", { class: "fednb-tick", x: left, y: bottom + 16, "text-anchor": "middle" }, "1"),
    s("text", { class: "fednb-tick", x: right, y: bottom + 16, "text-anchor": "middle" }, String(trees)),
    s("text", { class: "fednb-tick", x: (left + right) / 2, y: bottom + 24, "text-anchor": "middle" }, "tree"),
    s("text", { class: "fednb-panel-title", x: left + 8, y: top + 2, style: `fill: ${PALETTE[0]}` },
      "loss (training rows)"));
  const curve = (points, y, key, className, color, dashed, label) => {
    const d = points.map((r, i) => `${i ? "L" : "M"}${x(r.tree).toFixed(1)},${y(r[key]).toFixed(1)}`).join(" ");
    svg.append(s("path", { class: `fednb-curve${dashed ? " fednb-party-curve" : ""}`, d, stroke: color,
      "stroke-width": 2 }));
    for (const r of points) {
      const point = s("circle", { class: className, cx: x(r.tree).toFixed(1), cy: y(r[key]).toFixed(1), r: 2.5,
        style: `fill: ${color}`, "data-tree": r.tree });
      point.append(s("title", {}, `tree ${r.tree}: ${label} ${fixed(r[key], 4)}` +
        (key === "loss" ? `, ${fixed(r.seconds, 2)} s` : "")));
      svg.append(point);
    }
  };
  curve(losses, yLoss, "loss", "fednb-tree-point", PALETTE[0], false, "loss");
  if (metric) {
    svg.append(s("line", { class: "fednb-axis-line", x1: right, y1: top, x2: right, y2: bottom }),
      s("text", { class: "fednb-tick", x: right + 6, y: bottom + 4 }, String(Number(metricLow.toFixed(2)))),
      s("text", { class: "fednb-tick", x: right + 6, y: top + 4 }, String(Number(metricHigh.toFixed(2)))),
      s("text", { class: "fednb-panel-title", x: right - 8, y: top + 2, "text-anchor": "end",
        style: `fill: ${PALETTE[1]}` }, `test ${metric[1]}`));
    curve(scored, yMetric, metric[0], "fednb-metric-point", PALETTE[1], true, `test ${metric[1]}`);
  }
  return svg;
}

// After training: the gain of each feature's splits as horizontal bars, labelled party:feature, coloured by party.
function importanceChart(state) {
  const rows = state.importance.slice(0, IMPORTANCE_SHOWN);
  const named = state.parties.map((p) => p.name);
  for (const r of state.importance) if (!named.includes(r.party)) named.push(r.party);
  const color = (party) => PALETTE[named.indexOf(party) % PALETTE.length];
  const row = 16;
  const label = 120;
  const top = 34;
  const bar = WIDTH - label - 130;
  const more = state.importance.length - rows.length;
  const height = top + row * rows.length + (more > 0 ? 18 : 6);
  const high = Math.max(...rows.map((r) => r.gain), 0) || 1;
  const svg = s("svg", { class: "fednb-chart fednb-importance", viewBox: `0 0 ${WIDTH} ${height}`, role: "img",
    "aria-label": "feature importance: gain per feature, by party" });
  svg.append(s("text", { class: "fednb-panel-title", x: 0, y: 12 }, "feature importance: gain of each feature's splits"));
  named.forEach((party, i) => {
    svg.append(s("rect", { x: i * 110, y: 19, width: 10, height: 10, style: `fill: ${color(party)}` }),
      s("text", { class: "fednb-tick", x: i * 110 + 14, y: 28 }, party));
  });
  rows.forEach((r, i) => {
    const y = top + i * row;
    const size = Math.max((bar * r.gain) / high, 1);
    const rect = s("rect", { class: "fednb-importance-bar", x: label, y: y + 2, width: size.toFixed(1),
      height: row - 4, style: `fill: ${color(r.party)}`, "data-party": r.party, "data-feature": r.feature });
    rect.append(s("title", {}, `${r.party}:${r.feature}: gain ${gainText(r.gain)}, ${r.splits} splits`));
    svg.append(s("text", { class: "fednb-tick", x: label - 6, y: y + 11, "text-anchor": "end" }, `${r.party}:${r.feature}`),
      rect, s("text", { class: "fednb-tick", x: label + size + 4, y: y + 11 },
        `${gainText(r.gain)} (${r.splits} split${r.splits === 1 ? "" : "s"})`));
  });
  if (more > 0) svg.append(s("text", { class: "fednb-tick", x: label, y: height - 4 }, `… and ${more} more features`));
  return svg;
}

function render({ model, el }) {
  const root = h("div", "fednb-dashboard fednb-vertical");
  el.append(root);
  const boosting = () => model.get("mode") === "boosting";

  const draw = () => {
    const state = Object.fromEntries(TRAITS.map((name) => [name, model.get(name)]));
    const header = h("div", "fednb-header");
    const stateText = { idle: "starting", training: "training", done: "done", error: "failed" }[state.state];
    header.append(h("span", "fednb-title", state.title), h("span", "fednb-strategy", state.detail),
      h("span", `fednb-state fednb-state-${state.state}`, stateText));
    root.dataset.mode = state.mode;
    const progress = boosting() ? treeProgress(state) : progressText(state);
    const bar = h("div", "fednb-progress-bar");
    const fill = h("div", "fednb-progress-fill");
    fill.style.width = `${(progress.fraction * 100).toFixed(1)}%`;
    bar.append(fill);
    const split = state.split && isNumber(state.split.train)
      ? ` · ${state.aligned} aligned rows: train ${state.split.train}, test ${state.split.test}` : "";
    const parts = [header, bar, h("div", "fednb-progress-text", progress.text + split)];
    if (state.error) parts.push(h("div", "fednb-error", state.error));
    parts.push(partiesTable(state), boosting() ? treeChart(state) : lossChart(state));
    if (boosting() && state.importance.length) parts.push(importanceChart(state));
    const known = METRICS.filter(([key]) => isNumber(state.metrics[key]));
    if (known.length) {
      parts.push(h("div", "fednb-metrics fednb-progress-text",
        "test split: " + known.map(([key, name]) => `${name} ${fixed(state.metrics[key], 4)}`).join(" · ")));
    } else if (state.note) {
      parts.push(h("div", "fednb-progress-text", state.note));
    }
    root.replaceChildren(...parts);
  };

  draw();
  for (const name of TRAITS) model.on(`change:${name}`, draw);
  return () => {
    for (const name of TRAITS) model.off(`change:${name}`, draw);
  };
}

export default { render };
