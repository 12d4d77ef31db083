// Tiny DOM helpers: text always goes in as text nodes (never innerHTML), so no API value can inject markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function mount(...children) {
  const main = document.getElementById("main");
  main.replaceChildren();
  append(main, children);
  return main;
}

export function table(columns, rows, { empty = "Nothing here." } = {}) {
  // columns: [{ title, cell: row => node|text, num }]
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : null }, c.cell(r)))))));
}

export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err && err.message ? err.message : String(err));
}

export function field(label, input) { return h("label", {}, label, input); }

export function usd(v) { return v == null ? "" : `$${Number(v).toFixed(v < 1 ? 4 : 2)}`; }
export function int(v) { return v == null ? "" : Number(v).toLocaleString("en-US"); }
export function when(v) { return v ? String(v).replace("T", " ").slice(0, 19) : ""; }

export function limitsText(l) {
  if (!l) return "";
  const parts = [];
  for (const k of ["rpm", "tpm", "max_concurrency", "max_tokens"]) if (l[k] != null) parts.push(`${k} ${l[k]}`);
  if (l.budget_usd != null) parts.push(`budget $${l.budget_usd}/${l.budget_period}`);
  if (l.models) parts.push(`models ${l.models.join(",")}`);
  return parts.join(" · ");
}

// Form values of the limits editor -> a JSON merge patch (empty field: remove the limit).
export function limitsEditor(current) {
  const l = current || {};
  const inputs = {
    rpm: h("input", { name: "rpm", type: "number", min: 1, value: l.rpm ?? "" }),
    tpm: h("input", { name: "tpm", type: "number", min: 1, value: l.tpm ?? "" }),
    max_concurrency: h("input", { name: "max_concurrency", type: "number", min: 1, value: l.max_concurrency ?? "" }),
    max_tokens: h("input", { name: "max_tokens", type: "number", min: 1, value: l.max_tokens ?? "" }),
    budget_usd: h("input", { name: "budget_usd", type: "number", min: 0, step: "0.01", value: l.budget_usd ?? "" }),
    budget_period: h("select", { name: "budget_period" },
      ["day", "month", "total"].map((p) => h("option", { value: p, selected: (l.budget_period || "month") === p }, p))),
    models: h("input", { name: "models", placeholder: "claude-*, gpt-4o", value: (l.models || []).join(", ") }),
  };
  const node = h("div", { class: "bar" }, Object.entries(inputs).map(([k, el]) => field(k, el)));
  const value = () => {
    const out = {};
    for (const k of ["rpm", "tpm", "max_concurrency", "max_tokens"]) {
      out[k] = inputs[k].value === "" ? null : parseInt(inputs[k].value, 10);
    }
    out.budget_usd = inputs.budget_usd.value === "" ? null : parseFloat(inputs.budget_usd.value);
    if (out.budget_usd !== null) out.budget_period = inputs.budget_period.value;
    const models = inputs.models.value.split(",").map((s) => s.trim()).filter(Boolean);
    out.models = models.length ? models : null;
    return out;
  };
  return { node, value };
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    return false;
  }
}
