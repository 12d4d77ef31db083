// Admin views (and "My keys"): every list is paged and filtered by the server.
import * as api from "./api.js";
import { h, mount, table, errorBox, field, usd, int, when, limitsText, limitsEditor, copyText } from "./dom.js";

// A server-paged list: filters -> query, "Next"/"Previous" walk the cursors the API returns.
function pagedList({ path, columns, filters = {}, cursorParam = "cursor", nextField = "next_cursor", empty, id }) {
  const holder = h("div", { id });
  let stack = [null];
  let query = { ...filters };
  async function load() {
    const cursor = stack[stack.length - 1];
    holder.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      const page = await api.get(path, { ...query, limit: 50, [cursorParam]: cursor });
      const next = page[nextField];
      holder.replaceChildren(
        table(columns, page.data, { empty }),
        h("div", { class: "bar" },
          h("button", { type: "button", disabled: stack.length === 1, onclick: () => { stack.pop(); load(); } }, "Previous"),
          h("button", { type: "button", class: "next-page", disabled: !next, onclick: () => { stack.push(next); load(); } }, "Next")));
    } catch (e) {
      holder.replaceChildren(errorBox(e));
    }
  }
  return {
    node: holder,
    reload: load,
    filter(q) { query = { ...q }; stack = [null]; return load(); },
  };
}

function filterBar(inputs, onApply) {
  return h("form", { class: "bar", onsubmit: (ev) => { ev.preventDefault(); onApply(); } },
    Object.entries(inputs).map(([k, el]) => field(k, el)), h("button", { type: "submit" }, "Filter"));
}

function values(inputs) {
  return Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value]));
}

// ---------------------------------------------------------------- users

export async function usersView() {
  const msg = h("div", {});
  const edit = h("div", {});
  const list = pagedList({
    path: "/admin/users", id: "users-table",
    columns: [
      { title: "Email", cell: (u) => u.email },
      { title: "Name", cell: (u) => u.name },
      { title: "Role", cell: (u) => u.role },
      { title: "Status", cell: (u) => (u.disabled ? "disabled" : "active") },
      { title: "Limits", cell: (u) => limitsText(u.limits) },
      { title: "Created", cell: (u) => when(u.created_at) },
      { title: "", cell: (u) => h("span", {},
          h("button", { type: "button", onclick: () => editUser(u) }, "Edit"), " ",
          h("a", { href: `#/keys?user_id=${u.id}` }, "Keys"), " ",
          h("button", { type: "button", class: u.disabled ? null : "danger",
                        onclick: () => setDisabled(u, !u.disabled) }, u.disabled ? "Enable" : "Disable")) },
    ],
  });
  async function setDisabled(u, disabled) {
    msg.replaceChildren();
    try { await api.patch(`/admin/users/${u.id}`, { disabled }); await list.reload(); } catch (e) { msg.append(errorBox(e)); }
  }
  function editUser(u) {
    const name = h("input", { name: "name", value: u.name });
    const role = h("select", { name: "role" }, ["user", "admin"].map((r) => h("option", { value: r, selected: u.role === r }, r)));
    const lim = limitsEditor(u.limits);
    const err = h("div", {});
    edit.replaceChildren(h("form", { class: "panel", id: "edit-user", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        await api.patch(`/admin/users/${u.id}`, { name: name.value, role: role.value, limits: lim.value() });
        edit.replaceChildren(); await list.reload();
      } catch (e) { err.replaceChildren(errorBox(e)); }
    } }, h("h2", {}, `Edit ${u.email}`), h("div", { class: "bar" }, field("name", name), field("role", role)),
      lim.node, h("button", { type: "submit", class: "primary" }, "Save"), " ",
      h("button", { type: "button", onclick: () => edit.replaceChildren() }, "Cancel"), err));
  }
  const create = { email: h("input", { name: "email", type: "email", required: true }),
                   name: h("input", { name: "name" }),
                   password: h("input", { name: "password", type: "password", autocomplete: "new-password" }),
                   role: h("select", { name: "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin")) };
  const createForm = h("form", { class: "bar panel", id: "create-user", onsubmit: async (ev) => {
    ev.preventDefault(); msg.replaceChildren();
    const body = values(create);
    if (!body.password) delete body.password;
    try { await api.post("/admin/users", body); createForm.reset(); await list.reload(); msg.append(h("p", { class: "ok" }, "User created.")); }
    catch (e) { msg.append(errorBox(e)); }
  } }, Object.entries(create).map(([k, el]) => field(k, el)), h("button", { type: "submit", class: "primary" }, "Create user"));
  const f = { email: h("input", { name: "filter-email", placeholder: "part of an email" }),
              role: h("select", { name: "filter-role" }, ["", "admin", "user"].map((r) => h("option", { value: r }, r || "any"))),
              disabled: h("select", { name: "filter-disabled" }, ["", "false", "true"].map((r) => h("option", { value: r }, r || "any"))) };
  mount(h("h1", {}, "Users"), createForm, msg, filterBar(f, () => list.filter(values(f))), edit, list.node);
  await list.reload();
}

// ---------------------------------------------------------------- keys (admin: all; user: own)

export async function keysView(params, { own }) {
  const base = own ? "/me/keys" : "/admin/keys";
  const msg = h("div", {});
  const shown = h("div", { id: "new-key" });
  const edit = h("div", {});
  const filters = own ? {} : { user_id: params.get("user_id") || "" };
  const list = pagedList({
    path: base, id: "keys-table", filters,
    columns: [
      { title: "Prefix", cell: (k) => h("code", {}, k.prefix) },
      { title: "Name", cell: (k) => k.name },
      ...(own ? [] : [{ title: "User", cell: (k) => h("a", { href: `#/keys?user_id=${k.user_id}` }, k.user_id.slice(0, 8)) }]),
      { title: "Status", cell: (k) => h("span", { class: `key-status status-${k.status === "active" ? "ok" : "down"}` }, k.status) },
      { title: "Limits", cell: (k) => limitsText(k.limits) },
      { title: "Last used", cell: (k) => when(k.last_used_at) },
      { title: "Created", cell: (k) => when(k.created_at) },
      { title: "", cell: (k) => k.status === "revoked" ? "" : h("span", {},
          h("button", { type: "button", onclick: () => editKey(k) }, "Edit"), " ",
          h("button", { type: "button", class: "danger revoke", dataset: { prefix: k.prefix },
                        onclick: () => revoke(k) }, "Revoke")) },
    ],
    empty: "No keys.",
  });
  async function revoke(k) {
    msg.replaceChildren();
    if (!window.confirm(`Revoke key ${k.prefix}…? Requests with it fail at once.`)) return;
    try { await api.del(`${base}/${k.id}`); msg.append(h("p", { class: "ok" }, `Key ${k.prefix} revoked.`)); await list.reload(); }
    catch (e) { msg.append(errorBox(e)); }
  }
  function editKey(k) {
    const name = h("input", { name: "name", value: k.name });
    const lim = limitsEditor(k.limits);
    const err = h("div", {});
    edit.replaceChildren(h("form", { class: "panel", id: "edit-key", onsubmit: async (ev) => {
      ev.preventDefault();
      try { await api.patch(`${base}/${k.id}`, { name: name.value, limits: lim.value() }); edit.replaceChildren(); await list.reload(); }
      catch (e) { err.replaceChildren(errorBox(e)); }
    } }, h("h2", {}, `Edit key ${k.prefix}`), field("name", name), lim.node,
      h("button", { type: "submit", class: "primary" }, "Save"), " ",
      h("button", { type: "button", onclick: () => edit.replaceChildren() }, "Cancel"), err));
  }
  function showOnce(created) {
    // The only time the key exists outside the caller's hands: shown once, never stored by the page.
    const box = h("input", { class: "secret", id: "new-key-value", readOnly: true, value: created.key });
    const copied = h("span", { class: "ok", id: "copy-status" });
    shown.replaceChildren(h("div", { class: "panel" },
      h("h2", {}, "New key — copy it now, it is not shown again"),
      h("div", { class: "bar" }, box,
        h("button", { type: "button", id: "copy-key", onclick: async () => {
          box.select();
          copied.textContent = (await copyText(created.key)) ? "Copied." : "Copy failed: select the key and copy it.";
        } }, "Copy"),
        h("button", { type: "button", id: "dismiss-key", onclick: () => shown.replaceChildren() }, "Done")), copied));
  }
  const create = { name: h("input", { name: "key-name" }) };
  if (!own) create.user_id = h("input", { name: "key-user", placeholder: "user id", value: params.get("user_id") || "", required: true });
  const createForm = h("form", { class: "bar panel", id: "create-key", onsubmit: async (ev) => {
    ev.preventDefault(); msg.replaceChildren();
    try {
      const created = await api.post(base, values(create));
      create.name.value = "";
      showOnce(created);
      await list.reload();
    } catch (e) { msg.append(errorBox(e)); }
  } }, Object.entries(create).map(([k, el]) => field(k, el)), h("button", { type: "submit", class: "primary" }, "Create key"));
  const f = { status: h("select", { name: "filter-status" }, ["", "active", "revoked", "expired"].map((s) => h("option", { value: s }, s || "any"))),
              name: h("input", { name: "filter-name", placeholder: "exact name" }) };
  if (!own) f.user_id = h("input", { name: "filter-user", value: params.get("user_id") || "", placeholder: "user id" });
  mount(h("h1", {}, own ? "My keys" : "Keys"), createForm, shown, msg, filterBar(f, () => list.filter(values(f))), edit, list.node);
  await list.reload();
}

// ---------------------------------------------------------------- budgets

export async function budgetsView(params) {
  const scope = params.get("scope") === "user" ? "user" : "key";
  const meter = (ratio) => {
    const bar = h("span", { class: ratio >= 1 ? "over" : ratio >= 0.8 ? "warn" : null });
    bar.style.width = `${Math.min(100, Math.round(ratio * 100))}%`;
    return h("span", {}, h("span", { class: "meter" }, bar), ` ${(ratio * 100).toFixed(1)}%`);
  };
  const list = pagedList({
    path: "/admin/budgets", id: "budgets-table", filters: { scope },
    columns: [
      { title: scope === "key" ? "Key" : "User", cell: (b) => (scope === "key" ? h("code", {}, b.prefix) : b.email) },
      { title: "Name", cell: (b) => b.name },
      ...(scope === "key" ? [{ title: "Owner", cell: (b) => b.email }] : []),
      { title: "Period", cell: (b) => `${b.budget_period}${b.period_start ? ` since ${b.period_start}` : ""}` },
      { title: "Spent", num: true, cell: (b) => usd(b.spent_usd) },
      { title: "Limit", num: true, cell: (b) => usd(b.budget_usd) },
      { title: "Used", cell: (b) => meter(b.used_ratio) },
    ],
    empty: `No ${scope === "key" ? "key" : "user"} has a budget.`,
  });
  mount(h("h1", {}, "Budgets"),
    h("div", { class: "bar" }, h("a", { href: "#/budgets?scope=key", class: scope === "key" ? "active" : null }, "Per key"),
      " · ", h("a", { href: "#/budgets?scope=user", class: scope === "user" ? "active" : null }, "Per user")),
    list.node);
  await list.reload();
}

// ---------------------------------------------------------------- audit

export async function auditView() {
  const list = pagedList({
    path: "/admin/audit", id: "audit-table", cursorParam: "before", nextField: "next_before",
    columns: [
      { title: "When", cell: (a) => when(a.at) },
      { title: "Actor", cell: (a) => a.actor_id ? `${a.actor} ${a.actor_id.slice(0, 8)}` : a.actor },
      { title: "Action", cell: (a) => a.action },
      { title: "Target", cell: (a) => `${a.target_type} ${a.target_id}` },
      { title: "Details", cell: (a) => h("code", {}, JSON.stringify(a.details)) },
      { title: "IP", cell: (a) => a.ip || "" },
    ],
  });
  const f = { target_id: h("input", { name: "filter-target", placeholder: "user or key id" }) };
  mount(h("h1", {}, "Audit log"), filterBar(f, () => list.filter(values(f))), list.node);
  await list.reload();
}

// ---------------------------------------------------------------- health

export async function healthView() {
  const body = h("div", { id: "health" }, h("p", { class: "muted" }, "Loading…"));
  mount(h("h1", {}, "Health"), h("div", { class: "bar" }, h("button", { type: "button", onclick: () => load() }, "Refresh")), body);
  async function load() {
    try {
      const s = await api.get("/admin/health");
      const st = (v) => h("span", { class: `status-${v}` }, v);
      const m = s.metrics;
      body.replaceChildren(
        h("p", {}, "Gateway: ", st(s.status === "ready" ? "ok" : "down"), ` (${s.status}) · workers ${m.workers} · in flight ${m.in_flight}`),
        h("h2", {}, "Dependencies"),
        table([{ title: "Dependency", cell: (r) => r[0] }, { title: "Status", cell: (r) => st(r[1].status) },
               { title: "Probe", cell: (r) => (r[1].ms != null ? `${r[1].ms} ms` : r[1].error || "") },
               { title: "Workers degraded", num: true, cell: (r) => m.degraded[r[0]] ?? "" }],
              [["postgres", s.checks.postgres], ["redis", s.checks.redis]]),
        h("h2", {}, "Upstream circuits"),
        table([{ title: "Upstream", cell: (r) => r[0] }, { title: "Circuit", cell: (r) => st(r[1]) }],
              Object.entries(s.checks.circuits.upstreams), { empty: "No upstreams." }),
        h("h2", {}, "Requests since start, by status"),
        table([{ title: "Status", cell: (r) => r[0] }, { title: "Requests", num: true, cell: (r) => int(r[1]) }],
              Object.entries(m.requests_by_status), { empty: "No requests yet." }),
        h("h2", {}, "Last hour (usage ledger, 5-minute buckets)"),
        table([{ title: "From", cell: (r) => when(r.bucket) }, { title: "Requests", num: true, cell: (r) => int(r.requests) },
               { title: "5xx", num: true, cell: (r) => int(r.server_errors) }, { title: "4xx", num: true, cell: (r) => int(r.client_errors) },
               { title: "Cut streams", num: true, cell: (r) => int(r.partial) },
               { title: "Error rate", num: true, cell: (r) => `${(r.error_rate * 100).toFixed(2)}%` }],
              s.recent, { empty: "No requests recorded in the last hour." }));
    } catch (e) {
      body.replaceChildren(errorBox(e));
    }
  }
  await load();
}
