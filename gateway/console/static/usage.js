// Usage over time: a chart of cost and tokens by day, a grouped table, CSV export.
import uPlot from "./vendor/uPlot.esm.js";
import * as api from "./api.js";
import { h, mount, table, errorBox, field, usd, int } from "./dom.js";

const MAX_TABLE_ROWS = 500;

function isoDay(d) { return d.toISOString().slice(0, 10); }

export async function usageView(params, { own }) {
  const path = own ? "/me/usage" : "/admin/usage";
  const today = new Date();
  const inputs = {
    // Default: since the first day of last month (whole months come from the monthly rollup: fast by key).
    from: h("input", { name: "from", type: "date", value: params.get("from") || isoDay(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth() - 1, 1))) }),
    to: h("input", { name: "to", type: "date", value: params.get("to") || "" }),
    group_by: h("select", { name: "group_by" }, (own ? ["day", "model", "key"] : ["day", "model", "key", "user"])
      .map((g) => h("option", { value: g, selected: (params.get("group_by") || "day") === g }, g))),
    model: h("input", { name: "model", value: params.get("model") || "" }),
    key_id: h("input", { name: "key_id", value: params.get("key_id") || "", placeholder: "key id" }),
  };
  if (!own) inputs.user_id = h("input", { name: "user_id", value: params.get("user_id") || "", placeholder: "user id" });
  const chartBox = h("div", { id: "chart" });
  const totals = h("p", { id: "usage-totals" });
  const tableBox = h("div", { id: "usage-table" });
  const msg = h("div", {});
  const query = () => {
    const q = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value]));
    if (q.to) q.to = isoDay(new Date(new Date(q.to).getTime() + 864e5));  // the picked day included
    return api.clean(q);
  };
  let chart = null;

  async function load() {
    msg.replaceChildren();
    const q = query();
    try {
      const [daily, grouped] = await Promise.all([
        api.get(path, { ...q, group_by: "day" }),
        q.group_by === "day" ? null : api.get(path, q),
      ]);
      drawChart(daily.data);
      const rep = grouped || daily;
      totals.textContent = `${int(rep.totals.requests)} requests · ${int(rep.totals.input_tokens)} input tokens · ` +
        `${int(rep.totals.output_tokens)} output tokens · ${usd(rep.totals.cost_usd)}` + (rep.truncated ? " (truncated)" : "");
      const g = q.group_by || "day";
      const col = { day: "day", model: "model", key: "key_id", user: "user_id" }[g];
      const rows = rep.data.slice(0, MAX_TABLE_ROWS);
      const more = rep.data.length > rows.length
        ? [h("p", { class: "muted" }, `First ${rows.length} of ${rep.data.length} rows; export CSV for all.`)] : [];
      tableBox.replaceChildren(
        table([
          { title: g, cell: (r) => r[col] },
          { title: "Requests", num: true, cell: (r) => int(r.requests) },
          { title: "Input tokens", num: true, cell: (r) => int(r.input_tokens) },
          { title: "Output tokens", num: true, cell: (r) => int(r.output_tokens) },
          { title: "Cache read", num: true, cell: (r) => int(r.cache_read_tokens) },
          { title: "Cost", num: true, cell: (r) => usd(r.cost_usd) },
        ], rows, { empty: "No usage in this range." }), ...more);
    } catch (e) {
      msg.append(errorBox(e));
    }
  }

  function drawChart(rows) {
    const xs = rows.map((r) => Date.parse(`${r.day}T00:00:00Z`) / 1000);
    const data = [xs, rows.map((r) => Number(r.cost_usd)), rows.map((r) => r.input_tokens + r.output_tokens)];
    if (chart) chart.destroy();
    chartBox.replaceChildren();
    if (!rows.length) { chartBox.append(h("p", { class: "muted" }, "No usage in this range.")); chart = null; return; }
    const width = Math.max(400, chartBox.clientWidth || 900);
    chart = new uPlot({
      width, height: 300, title: "Cost and tokens by day (UTC)",
      scales: { x: { time: true }, usd: {}, tok: {} },
      series: [{}, { label: "Cost (USD)", scale: "usd", stroke: "#2952cc", width: 2, points: { show: true } },
               { label: "Tokens", scale: "tok", stroke: "#dc6803", width: 2, points: { show: true } }],
      axes: [{}, { scale: "usd", values: (u, v) => v.map((x) => `$${x}`) }, { scale: "tok", side: 1, grid: { show: false } }],
    }, data, chartBox);
    chartBox.dataset.points = String(rows.length);
  }

  async function exportCsv() {
    msg.replaceChildren();
    try {
      const r = await api.call("GET", `${path}?${new URLSearchParams({ ...query(), format: "csv" })}`, undefined, { raw: true });
      const url = URL.createObjectURL(await r.blob());
      const a = h("a", { href: url, download: "usage.csv" });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      msg.append(errorBox(e));
    }
  }

  mount(h("h1", {}, own ? "My usage" : "Usage"),
    h("form", { class: "bar", id: "usage-form", onsubmit: (ev) => { ev.preventDefault(); load(); } },
      Object.entries(inputs).map(([k, el]) => field(k, el)),
      h("button", { type: "submit", class: "primary" }, "Show"),
      h("button", { type: "button", id: "export-csv", onclick: exportCsv }, "Export CSV")),
    msg, chartBox, totals, tableBox);
  await load();
}
