// The fednb approvals widget: requests awaiting a party's owner, with Approve / Deny buttons.
// Plain DOM, no dependencies. State arrives as traits (see serve.py); the one message sent back
// is {action: "approve" | "deny", hash, rounds}. Stable hooks for tests: .fednb-approvals,
// div.fednb-request[data-hash], button.fednb-approve, button.fednb-deny, input.fednb-rounds.

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
}

function render({ model, el }) {
  const root = h("div", "fednb-approvals");
  el.appendChild(root);
  const redraw = () => draw(model, root);
  for (const name of ["party", "policy", "endpoint", "pending", "decided", "error"]) model.on("change:" + name, redraw);
  redraw();
  return () => {
    for (const name of ["party", "policy", "endpoint", "pending", "decided", "error"]) model.off("change:" + name, redraw);
  };
}

export default { render };
