// The fednb view of vertical training: an anywidget ESM drawn with plain DOM and SVG, no dependencies.
// The state arrives as traits (see vertical_view.py); nothing is sent back. It reuses dashboard.css.
// Stable hooks for tests: .fednb-vertical, tr.fednb-party[data-party] with span.fednb-role[data-role],
// svg.fednb-chart with circle.fednb-loss-point[data-model][data-epoch], div.fednb-metrics.

const TRAITS = ["title", "detail", "state", "parties", "aligned", "split", "epochs", "labels", "models",
  "metrics", "note", "elapsed", "error"];
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const METRICS = [["auc", "AUC"], ["accuracy", "accuracy"], ["ks", "KS"], ["logloss", "log-loss"]];
const WIDTH = 720;
const HEIGHT = 200;
const MARGIN = { left: 44, right: 12, top: 14, bottom: 28 };

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
  const svg = s("svg", { class: "fednb-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": "loss per epoch" });
  const points = state.models.flatMap((m) => m.history.filter((e) => isNumber(e.loss)));
  const left = MARGIN.left;
  const right = WIDTH - MARGIN.right;
  const top = MARGIN.top;
  const bottom = HEIGHT - MARGIN.bottom;
  svg.append(s("line", { class: "fednb-axis-line", x1: left, y1: bottom, x2: right, y2: bottom }),
    s("line", { class: "fednb-axis-line", x1: left, y1: top, x2: left, y2: bottom }));
  if (points.length === 0) {
    const text = state.models.length ? "no loss: it is computed with one feature party" : "waiting for the first epoch";
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

function render({ model, el }) {
  const root = h("div", "fednb-dashboard fednb-vertical");
  el.append(root);

  const draw = () => {
    const state = Object.fromEntries(TRAITS.map((name) => [name, model.get(name)]));
    const header = h("div", "fednb-header");
    const stateText = { idle: "starting", training: "training", done: "done", error: "failed" }[state.state];
    header.append(h("span", "fednb-title", state.title), h("span", "fednb-strategy", state.detail),
      h("span", `fednb-state fednb-state-${state.state}`, stateText));
    const progress = progressText(state);
    const bar = h("div", "fednb-progress-bar");
    const fill = h("div", "fednb-progress-fill");
    fill.style.width = `${(progress.fraction * 100).toFixed(1)}%`;
    bar.append(fill);
    const split = state.split && isNumber(state.split.train)
      ? ` · ${state.aligned} aligned rows: train ${state.split.train}, test ${state.split.test}` : "";
    const parts = [header, bar, h("div", "fednb-progress-text", progress.text + split)];
    if (state.error) parts.push(h("div", "fednb-error", state.error));
    parts.push(partiesTable(state), lossChart(state));
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
