// The Mesh Server's control plane for a browser (docs/server-api.md): enrolment with the
// page's RTCCertificate, tokens (in localStorage; no cookies anywhere), REST calls with a
// Bearer header, and the WebSocket opened with a single-use ticket (browsers cannot set
// headers on a WebSocket).
const API = "/api/v1";
const DB_NAME = "meshagent";
const SESSION_KEY = "meshagent.session";

/** An error the server answered: `code` is its ApiError `error`, `status` the HTTP status. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

// ------------------------------------------------------------------ identity (IndexedDB)

function idb(mode, run) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB_NAME, 1);
    open.onupgradeneeded = () => open.result.createObjectStore("identity");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction("identity", mode);
      const request = run(tx.objectStore("identity"));
      tx.oncomplete = () => { open.result.close(); resolve(request.result); };
      tx.onerror = () => reject(tx.error);
    };
  });
}

/** The page's RTCCertificate: its DTLS identity, kept so a reload keeps the device. `name`
 * keeps separate identities (a share link's guest is never the logged-in device). */
export async function certificate(name = "device") {
  const now = Date.now();
  let cert = await idb("readonly", (store) => store.get(name)).catch(() => undefined);
  if (!cert || cert.expires - now < 7 * 86400e3) {
    cert = await RTCPeerConnection.generateCertificate({ name: "ECDSA", namedCurve: "P-256", expires: 365 * 86400e3 });
    await idb("readwrite", (store) => store.put(cert, name));
  }
  return cert;
}

export async function forgetCertificate(name) {
  await idb("readwrite", (store) => store.delete(name)).catch(() => {});
}

/** The device id a certificate gives: its SHA-256 fingerprint, lowercase hex, no colons. */
export function fingerprintOf(cert) {
  const sha = cert.getFingerprints().find((f) => f.algorithm === "sha-256");
  return sha.value.replaceAll(":", "").toLowerCase();
}

// ------------------------------------------------------------------ REST

async function call(method, path, { body = undefined, token = null } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "omit" });
  } catch (err) {
    throw new ApiError(0, "unreachable", "The server cannot be reached.");
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const message = data?.message || (Array.isArray(data?.detail) ? "invalid request" : data?.detail) || response.statusText;
    throw new ApiError(response.status, data?.error || `http_${response.status}`, message);
  }
  return data;
}

export const serverInfo = () => call("GET", "/info");

/** A session: tokens that refresh themselves, stored so a reload stays logged in. */
export class Session {
  constructor(state) {
    this.state = state; // {device_id, user, server_id, keys, access_token, refresh_token, access_expires_at, guest?}
    this._refreshing = null;
    this.onChange = () => {};
  }

  static load() {
    try {
      const raw = localStorage.getItem(SESSION_KEY);
      return raw ? new Session(JSON.parse(raw)) : null;
    } catch { return null; }
  }

  save() {
    if (!this.state.guest) localStorage.setItem(SESSION_KEY, JSON.stringify(this.state));
  }

  static clear() {
    localStorage.removeItem(SESSION_KEY);
  }

  get deviceId() { return this.state.device_id; }
  get user() { return this.state.user; }

  /** Enrols this browser: `{username, password}` or `{join_code}`. */
  static async enrol(credentials, deviceName) {
    const cert = await certificate();
    const answer = await call("POST", "/enroll/browser", { body: { ...credentials, device_name: deviceName, fingerprint: fingerprintOf(cert) } });
    const session = new Session({ ...answer, access_expires_at: Date.now() + answer.access_expires_in * 1000 });
    session.save();
    return session;
  }

  async token() {
    if (this.state.access_expires_at - Date.now() < 30e3 && this.state.refresh_token) await this.refresh();
    return this.state.access_token;
  }

  async refresh() {
    if (!this._refreshing) {
      this._refreshing = call("POST", "/token/refresh", { body: { refresh_token: this.state.refresh_token } })
        .then((pair) => {
          Object.assign(this.state, pair, { access_expires_at: Date.now() + pair.access_expires_in * 1000 });
          this.save();
          this.onChange();
        })
        .finally(() => { this._refreshing = null; });
    }
    return this._refreshing;
  }

  async call(method, path, body) {
    try {
      return await call(method, path, { body, token: await this.token() });
    } catch (err) {
      if (err.status === 401 && this.state.refresh_token) {
        await this.refresh();
        return call(method, path, { body, token: this.state.access_token });
      }
      throw err;
    }
  }

  devices() { return this.call("GET", "/devices").then((d) => d.devices); }
  rooms() { return this.call("GET", "/rooms").then((d) => d.rooms); }
  capability(aud, scope, resource = "", room = null) {
    return this.call("POST", "/capabilities", { aud, scope, resource, ...(room ? { room } : {}) }).then((g) => g.token);
  }
  ticket() { return this.call("POST", "/ws/ticket").then((t) => t.ticket); }
  /** {urls, username, password, expires_at}: the deployment's TURN, for this device only. */
  turnCredentials() { return this.call("POST", "/turn/credentials"); }
}

/** Claims a share link: a guest session that may reach only the link's sender. */
export async function claimLink(linkId, secret) {
  const cert = await certificate(`guest:${linkId}`);
  const answer = await call("POST", `/links/${encodeURIComponent(linkId)}/claim`, { body: { secret, fingerprint: fingerprintOf(cert) } });
  const session = new Session({ ...answer, guest: true, refresh_token: null, access_expires_at: Date.now() + answer.expires_in * 1000 });
  return { session, cert, link: answer };
}

// ------------------------------------------------------------------ WebSocket

/**
 * The server link: reconnects with a fresh ticket, renews its token in-band, and hands the
 * frames to `onFrame(frame)`. `onStatus(text)` hears connected / reconnecting.
 */
export class Link {
  constructor(session, { onFrame, onStatus = () => {} }) {
    this.session = session;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    this.socket = null;
    this.stopped = false;
    this.online = new Set();
    this._delay = 500;
    session.onChange = () => this.send({ type: "auth", access_token: session.state.access_token });
  }

  async start() {
    while (!this.stopped) {
      try {
        await this._once();
        this._delay = 500;
      } catch (err) {
        if (err.status === 401 || err.status === 403) {
          if (this.session.state.refresh_token) await this.session.refresh().catch(() => {});
          else { this.onStatus("signed out", err); return; }
        }
      }
      if (this.stopped) return;
      this.onStatus("reconnecting");
      await new Promise((r) => setTimeout(r, this._delay));
      this._delay = Math.min(this._delay * 2, 15000);
    }
  }

  _once() {
    return this.session.ticket().then((ticket) => new Promise((resolve, reject) => {
      const url = new URL(`${API}/ws?ticket=${encodeURIComponent(ticket)}`, location.href);
      url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(url);
      this.socket = socket;
      socket.onmessage = (event) => {
        let frame;
        try { frame = JSON.parse(event.data); } catch { return; }
        if (frame.type === "hello") {
          this.online = new Set(frame.online);
          this.onStatus("connected");
        } else if (frame.type === "presence") {
          if (frame.online) this.online.add(frame.device_id);
          else this.online.delete(frame.device_id);
        }
        this.onFrame(frame);
      };
      socket.onclose = (event) => {
        this.socket = null;
        if (event.code === 4401 || event.code === 4403) reject(Object.assign(new Error("token"), { status: 401 }));
        else resolve();
      };
    }));
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  stop() {
    this.stopped = true;
    this.socket?.close(1000);
  }
}
