// The console's only way to the gateway: the same JSON API as curl, same role checks.
// The access token lives in this module's memory only; the refresh token is an
// HttpOnly cookie the page cannot read, sent to /auth/session/* only.

const CSRF = { "x-gateway-csrf": "1" };
let access = null;      // { token, expiresAt }
let user = null;        // the logged-in user (from the token answer)

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export function currentUser() { return user; }

function remember(doc) {
  access = { token: doc.access_token, expiresAt: Date.now() + (doc.expires_in - 10) * 1000 };
  user = doc.user;
}

async function session(path, body) {
  const r = await fetch(`/auth/session${path}`, {
    method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { ...CSRF, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const doc = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, doc);
  return doc;
}

export async function login(email, password) {
  remember(await session("", { email, password }));
  return user;
}

let refreshing = null;  // one refresh at a time: a spent refresh token presented twice ends the session

export function resume() {
  // A reload keeps the session through the cookie; no cookie: not logged in.
  if (!refreshing) {
    // Across tabs too: the Web Locks API serialises refreshes of every console tab of this origin.
    const rotate = () => session("/refresh");
    const locked = navigator.locks ? navigator.locks.request("gw-console-refresh", rotate) : rotate();
    refreshing = locked
      .then((doc) => { remember(doc); return user; })
      .catch(() => { access = null; user = null; return null; })
      .finally(() => { refreshing = null; });
  }
  return refreshing;
}

export async function logout() {
  // The cookie names the session; an expired access token must not stand in the way.
  await fetch("/auth/session/logout", { method: "POST", credentials: "same-origin", headers: CSRF })
    .catch(() => null);
  access = null; user = null;
}

async function token() {
  if (access && Date.now() < access.expiresAt) return access.token;
  if (!(await resume())) throw new ApiError(401, { error: { message: "Your session has ended; log in again." } });
  return access.token;
}

export async function call(method, path, body, { raw = false } = {}) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { authorization: `Bearer ${await token()}` };
    if (body !== undefined) headers["content-type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                  cache: "no-store", credentials: "omit" });
    if (r.status === 401 && attempt === 0) { access = null; continue; }  // expired: refresh once
    if (raw && r.ok) return r;
    const doc = r.status === 204 ? null : await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, doc);
    return doc;
  }
  throw new ApiError(401, { error: { message: "Your session has ended; log in again." } });
}

export const get = (path, query) => call("GET", query ? `${path}?${new URLSearchParams(clean(query))}` : path);
export const post = (path, body) => call("POST", path, body);
export const patch = (path, body) => call("PATCH", path, body);
export const del = (path) => call("DELETE", path);

export function clean(query) {
  const out = {};
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") out[k] = v;
  return out;
}
