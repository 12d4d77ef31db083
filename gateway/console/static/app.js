// The console's shell: login, navigation by URL hash, one view at a time.
import * as api from "./api.js";
import { h, mount, errorBox } from "./dom.js";
import { usersView, keysView, budgetsView, auditView, healthView } from "./admin.js";
import { usageView } from "./usage.js";

const ADMIN_VIEWS = [
  ["users", "Users", usersView],
  ["keys", "Keys", (p) => keysView(p, { own: false })],
  ["usage", "Usage", (p) => usageView(p, { own: false })],
  ["budgets", "Budgets", budgetsView],
  ["audit", "Audit log", auditView],
  ["health", "Health", healthView],
];
const USER_VIEWS = [
  ["my-keys", "My keys", (p) => keysView(p, { own: true })],
  ["my-usage", "My usage", (p) => usageView(p, { own: true })],
];

function views() {
  const u = api.currentUser();
  return u && u.role === "admin" ? [...ADMIN_VIEWS, ...USER_VIEWS] : USER_VIEWS;
}

function parseHash() {
  const [name, query] = location.hash.replace(/^#\/?/, "").split("?");
  return { name, params: new URLSearchParams(query || "") };
}

function loginView() {
  document.getElementById("top").hidden = true;
  const email = h("input", { name: "email", type: "email", autocomplete: "username", required: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const msg = h("div", {});
  const form = h("form", {
    id: "login-form",
    onsubmit: async (ev) => {
      ev.preventDefault();
      msg.replaceChildren();
      try {
        await api.login(email.value, password.value);
        route();
      } catch (e) {
        msg.append(errorBox(e));
      }
    },
  }, h("label", {}, "Email", email), h("label", {}, "Password", password),
     h("button", { class: "primary", type: "submit", id: "login-submit" }, "Log in"), msg);
  mount(h("div", { class: "login panel" }, h("h1", {}, "llm-gateway console"), form));
}

function shell(active) {
  const top = document.getElementById("top");
  top.hidden = false;
  const u = api.currentUser();
  document.getElementById("whoami").textContent = `${u.email} (${u.role})`;
  document.getElementById("nav").replaceChildren(...views().map(([name, title]) =>
    h("a", { href: `#/${name}`, class: name === active ? "active" : null, dataset: { view: name } }, title)));
}

export async function route() {
  if (!api.currentUser()) {
    loginView();
    return;
  }
  const { name, params } = parseHash();
  const all = views();
  const found = all.find(([n]) => n === name);
  if (!found) {
    // Unknown or not allowed for this role: the first view this role has.
    location.replace(`#/${all[0][0]}`);
    return;
  }
  shell(found[0]);
  try {
    await found[2](params);
  } catch (e) {
    if (e.status === 401) { loginView(); return; }
    mount(h("h1", {}, found[1]), errorBox(e));
  }
}

async function start() {
  document.getElementById("logout").addEventListener("click", async () => {
    await api.logout();
    location.hash = "";
    loginView();
  });
  window.addEventListener("hashchange", route);
  await api.resume();
  await route();
}

start();
