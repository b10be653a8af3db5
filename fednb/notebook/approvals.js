// The fednb approvals widget: requests awaiting a party's owner, with Approve / Deny buttons.
// Plain DOM, no dependencies. State arrives as traits (see serve.py); the one message sent back
// is {action: "approve" | "deny", hash, rounds}. Stable hooks for tests: .fednb-approvals,
// div.fednb-request[data-hash], button.fednb-approve, button.fednb-deny, input.fednb-rounds,
// div.fednb-ledger[data-state] (the party's privacy ledger) with tr.fednb-charge rows.

const TRAITS = ["party", "policy", "endpoint", "pending", "decided", "error", "ledger"];

function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function codeBlock(label, text) {
  const box = h("div");
  box.appendChild(h("div", "fednb-meta", label));
  box.appendChild(h("pre", "fednb-code", text));
  return box;
}

function request(model, row) {
  const box = h("div", "fednb-request" + (row.refused ? " fednb-refused" : ""));
  box.dataset.hash = row.hash;
  const title = h("div");
  title.appendChild(h("span", "fednb-kind", row.kind));
  title.appendChild(h("code", "", row.hash.slice(0, 16) + "…"));
  if (row.refused) title.appendChild(h("span", "fednb-meta", "  refused under allowlist: approve to let it run next time"));
  box.appendChild(title);
  box.appendChild(h("div", "fednb-meta", "asked by " + row.coordinator + " at " + row.requested +
    (row.count > 1 ? " (" + row.count + " requests)" : "")));
  box.appendChild(h("div", "fednb-meta", "returns: " + row.returns));
  const code = row.code || {};
  if (code.model) box.appendChild(codeBlock("model source", code.model));
  if (code.cell) box.appendChild(codeBlock("cell", code.cell));
  if (code.loop) box.appendChild(h("div", "fednb-meta", "built-in loop: " + code.loop));
  const actions = h("div");
  const rounds = h("input", "fednb-rounds");
  rounds.type = "number";
  rounds.min = "1";
  rounds.placeholder = "rounds";
  rounds.title = "approve for this many rounds (empty: no limit)";
  const approve = h("button", "fednb-approve", "Approve");
  const deny = h("button", "fednb-deny", "Deny");
  approve.addEventListener("click", () => {
    const n = parseInt(rounds.value, 10);
    model.send({ action: "approve", hash: row.hash, rounds: Number.isFinite(n) && n > 0 ? n : null });
    approve.disabled = deny.disabled = true;
  });
  deny.addEventListener("click", () => {
    model.send({ action: "deny", hash: row.hash, rounds: null });
    approve.disabled = deny.disabled = true;
  });
  actions.append(rounds, approve, deny);
  box.appendChild(actions);
  return box;
}

function epsilon(value) {
  return typeof value === "number" && Number.isFinite(value) ? String(Number(value.toPrecision(4))) : "?";
}

// δ as it is usually written: 1e-5.
function delta(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toExponential() : "?";
}

// The owner's own privacy ledger: ε spent against the budget, a bar, and the latest charges.
function ledgerBox(ledger) {
  const box = h("div", "fednb-ledger");
  box.dataset.state = ledger.state || "none";
  if (ledger.state !== "ok") {
    box.appendChild(h("div", ledger.state === "error" ? "fednb-error" : "fednb-meta",
      "privacy ledger: " + (ledger.message || "no ledger yet")));
    return box;
  }
  const spent = ledger.epsilon_spent;
  const budget = ledger.epsilon_budget;
  box.appendChild(h("div", "fednb-ledger-head", "privacy budget: ε " + epsilon(spent) + " spent of " +
    epsilon(budget) + " (δ = " + delta(ledger.delta) + "), ε " + epsilon(ledger.epsilon_remaining) + " left"));
  const bar = h("div", "fednb-ledger-bar");
  const fill = h("div", "fednb-ledger-fill");
  const share = budget > 0 && typeof spent === "number" ? Math.min(1, Math.max(0, spent / budget)) : 0;
  fill.style.width = (100 * share).toFixed(1) + "%";
  if (share >= 0.9) fill.classList.add("fednb-ledger-low");
  bar.appendChild(fill);
  bar.title = "ε spent of the budget";
  box.appendChild(bar);
  const recent = ledger.recent || [];
  if (recent.length === 0) {
    box.appendChild(h("div", "fednb-meta", "no charges yet"));
    return box;
  }
  box.appendChild(h("div", "fednb-meta", "latest " + recent.length + " of " + ledger.charges + " charge(s):"));
  const table = h("table", "fednb-charges");
  const head = h("tr");
  for (const label of ["time", "for", "run", "round", "mechanism", "ε after"]) head.appendChild(h("th", "", label));
  table.appendChild(head);
  for (const entry of recent) {
    const tr = h("tr", "fednb-charge");
    for (const value of [entry.time, entry.by, entry.run, entry.round === null ? "—" : String(entry.round),
      entry.mechanism, epsilon(entry.epsilon_after)]) tr.appendChild(h("td", "", value));
    table.appendChild(tr);
  }
  box.appendChild(table);
  return box;
}

function draw(model, root) {
  root.replaceChildren();
  const pending = model.get("pending") || [];
  const endpoint = model.get("endpoint");
  root.appendChild(h("div", "fednb-head", "party " + model.get("party") + " (policy " + model.get("policy") + ")" +
    (endpoint ? " on " + endpoint : "")));
  if (pending.length === 0) root.appendChild(h("div", "fednb-none", "nothing awaits approval"));
  for (const row of pending) root.appendChild(request(model, row));
  const error = model.get("error");
  if (error) root.appendChild(h("div", "fednb-error", error));
  const decided = model.get("decided") || [];
  if (decided.length) root.appendChild(h("div", "fednb-decided", "decided: " + decided.slice(-3).join("; ")));
  const ledger = model.get("ledger") || {};
  if (ledger.state) root.appendChild(ledgerBox(ledger));
}

function render({ model, el }) {
  const root = h("div", "fednb-approvals");
  el.appendChild(root);
  const redraw = () => draw(model, root);
  for (const name of TRAITS) model.on("change:" + name, redraw);
  redraw();
  return () => {
    for (const name of TRAITS) model.off("change:" + name, redraw);
  };
}

export default { render };
