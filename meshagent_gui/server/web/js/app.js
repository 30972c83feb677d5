// The reference web client's page: sign in, devices and presence, send and receive files,
// watch a shared terminal, and the share-link page (/s/<id>#<secret>). Plain DOM, no
// framework; the protocol lives in wire.js, rtc.js, transfer.js and terminal.js.
import * as api from "./api.js";
import { Peers, checkToken } from "./peer.js";
import { StreamRole, ErrorCode, randomHex } from "./wire.js";
import { IncomingTransfer, sendFiles } from "./transfer.js";
import { TerminalViewer, filterQueries } from "./terminal.js";
import { downloadSink, pickedFileSink, saveName, downloadWorker } from "./save.js";
import { Terminal } from "../vendor/xterm.mjs";

const $ = (selector, root = document) => root.querySelector(selector);
const app = { session: null, link: null, peers: null, devices: new Map(), terminals: new Map(), transfers: [], viewer: null, term: null };
window.mesh = app; // for the console (and the browser tests)

export function humanSize(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

const status = (text) => { $("#status").textContent = text; };
const show = (id) => { for (const s of ["login", "home", "share"]) $(`#${s}`).hidden = s !== id; };

function explain(err) {
  if (err instanceof api.ApiError) {
    const known = {
      invalid_credentials: "Wrong user name or password.",
      join_code_unknown: "That join code is not known.",
      join_code_expired: "That join code has expired.",
      join_code_used: "That join code was used already.",
      rate_limited: "Too many attempts: wait a few minutes.",
      forbidden: "This browser cannot be enrolled to that account.",
      not_allowed: "Your role in this room does not allow that.",
      unknown_device: "That device is not reachable from here.",
      link_unknown: "This link is not valid (or its secret is wrong).",
      link_claimed: "This link was used already: ask the sender for a new one.",
      link_expired: "This link has expired: ask the sender for a new one.",
      unreachable: "The server cannot be reached.",
    };
    return known[err.code] || err.message;
  }
  return err?.message || String(err);
}

// ------------------------------------------------------------------ transfers (rows)

function transferRow(name, size, { list = $("#transfers"), direction = "" } = {}) {
  const row = $("#transfer-row").content.firstElementChild.cloneNode(true);
  $(".name", row).textContent = name;
  $(".meta", row).textContent = `${direction}${humanSize(size)}`;
  list.prepend(row);
  const record = { name, size, row, state: "starting", bytes: 0, error: null, cancel: null, started: performance.now(), finished: null };
  app.transfers.push(record);
  let last = { t: performance.now(), bytes: 0 };
  let speed = 0;
  record.progress = (bytes) => {
    record.bytes = bytes;
    $("progress", row).value = size ? bytes / size : 1;
    const now = performance.now();
    if (now - last.t > 500) {
      speed = ((bytes - last.bytes) * 1000) / (now - last.t);
      last = { t: now, bytes };
    }
    record.setState("running", `${humanSize(bytes)} of ${humanSize(size)}${speed ? `, ${humanSize(speed)}/s` : ""}`);
  };
  record.setState = (state, text) => {
    record.state = state;
    if (!["running", "starting"].includes(state)) record.finished ??= performance.now();
    row.className = `transfer ${state}`;
    $(".state", row).textContent = text;
    if (state !== "running" && state !== "starting") $(".cancel", row).hidden = true;
  };
  $(".cancel", row).addEventListener("click", () => record.cancel?.());
  return record;
}

/** Shows an incoming transfer: Save or Decline; on Save, streams it to disk. */
async function receiveOffer(channel, from, { list = $("#incoming"), transfers = $("#transfers"), senderName = null } = {}) {
  let offer;
  try {
    offer = await channel.receive();
  } catch { return; }
  if (!offer || offer.type !== "Offer") return channel.abort(ErrorCode.UNEXPECTED_MESSAGE, "expected an Offer");
  let incoming;
  try {
    incoming = new IncomingTransfer(channel, offer);
  } catch (err) {
    return channel.abort(err.code ?? ErrorCode.PROTOCOL_ERROR, err.message);
  }
  const files = incoming.files;
  const title = files.length === 1 ? saveName(files[0].entry.path) : `${files.length} files`;
  const sender = senderName || app.devices.get(from)?.name || from.slice(0, 12);
  const row = $("#offer-row").content.firstElementChild.cloneNode(true);
  $(".name", row).textContent = title;
  $(".meta", row).textContent = `from ${sender}, ${humanSize(offer.total_bytes)}`;
  list.append(row);
  if (list.id === "incoming") $("#incoming-section").hidden = false;
  const done = () => {
    row.remove();
    if (list.id === "incoming") $("#incoming-section").hidden = !list.children.length;
  };
  $(".decline", row).addEventListener("click", () => { done(); incoming.decline("declined in the browser").catch(() => {}); });
  $(".accept", row).addEventListener("click", async () => {
    done();
    // Ask for a place while this click still counts as the user's gesture.
    let picked = null;
    if ($("#ask-where")?.checked && "showSaveFilePicker" in window && files.length === 1) {
      try { picked = await pickedFileSink(saveName(files[0].entry.path)); } catch { picked = null; }
    }
    const record = transferRow(title, offer.total_bytes, { list: transfers, direction: `from ${sender}, ` });
    record.offer = offer;
    record.cancel = () => incoming.cancel();
    incoming.onProgress = (p) => record.progress(p.bytes);
    const openSink = async (entry) => (picked && files.length === 1 ? picked : downloadSink(saveName(entry.path), entry.size));
    try {
      const result = await incoming.accept(openSink);
      record.result = result;
      record.setState("done", result.files === files.length ? `Saved, ${humanSize(result.bytes)}, checked` : `${result.files} of ${files.length} files saved`);
    } catch (err) {
      record.error = explain(err);
      record.setState(incoming.state === "cancelled" ? "cancelled" : "failed", incoming.state === "cancelled" ? `Cancelled${err.message === "cancelled" ? "" : `: ${err.message}`}` : `Failed: ${explain(err)}`);
    }
  });
}

/** Accepts the agent's TRANSFER streams whose share token names this page; others are refused. */
function onChannel(hello, channel, from) {
  if (hello.role !== StreamRole.TRANSFER || !hello.tokens.length) return false;
  const expect = { keys: app.session.state.keys, serverId: app.session.state.server_id, audience: app.session.deviceId, subject: from };
  return checkToken(hello.tokens[0], { ...expect, scope: "share:file" })
    .catch(() => checkToken(hello.tokens[0], { ...expect, scope: "share:folder" }))
    .then((claims) => claims.res === hello.resource && (() => receiveOffer(channel, from, app.receiveInto)))
    .catch(() => false);
}

/** Sends `items` ([{file, path}]) to `deviceId`. */
async function sendTo(deviceId, items) {
  if (!items.length) return;
  const total = items.reduce((n, i) => n + i.file.size, 0);
  const title = items.length === 1 ? items[0].path : `${items[0].path.split("/")[0]} (${items.length} files)`;
  const record = transferRow(title, total, { direction: `to ${app.devices.get(deviceId)?.name ?? deviceId.slice(0, 12)}, ` });
  const abort = new AbortController();
  record.cancel = () => abort.abort();
  try {
    record.setState("starting", "Connecting…");
    const transferId = randomHex(16);
    const scope = items.some((i) => i.path.includes("/")) ? "share:folder" : "share:file";
    const [token, mesh] = await Promise.all([app.session.capability(deviceId, scope, transferId), app.peers.dial(deviceId)]);
    record.setState("starting", "Waiting for the device to accept…");
    const channel = await mesh.open(StreamRole.TRANSFER, { tokens: [token], resource: transferId });
    const result = await sendFiles(channel, items, { signal: abort.signal, onProgress: (p) => record.progress(p.sent) });
    record.result = result;
    const resumed = result.resumed ? ` (resumed: ${humanSize(result.resumed)} were there already)` : "";
    record.setState("done", `Sent, ${humanSize(result.bytes)}, checked by the device${resumed}`);
  } catch (err) {
    record.error = explain(err);
    record.setState(abort.signal.aborted ? "cancelled" : "failed", abort.signal.aborted ? "Cancelled" : `Failed: ${explain(err)}`);
  }
}

/** Files from a drop, folders walked (paths relative, '/'-separated). */
async function droppedItems(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  const items = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      items.push({ file, path: entry.fullPath.replace(/^\/+/, "") });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  if (!entries.length) for (const file of dataTransfer.files) items.push({ file, path: file.name });
  return items;
}

// ------------------------------------------------------------------ devices

function renderDevices() {
  const list = $("#devices");
  list.replaceChildren();
  const devices = [...app.devices.values()].sort((a, b) => Number(app.link?.online.has(b.id)) - Number(app.link?.online.has(a.id)) || a.name.localeCompare(b.name));
  $("#no-devices").hidden = devices.length > 0;
  for (const device of devices) {
    const row = $("#device-row").content.firstElementChild.cloneNode(true);
    const online = app.link?.online.has(device.id) ?? device.online;
    row.dataset.device = device.id;
    row.classList.toggle("online", online);
    $(".name", row).textContent = device.name;
    $(".meta", row).textContent = `${device.user} · ${device.platform} · ${online ? "online" : "offline"}${device.rooms?.length ? ` · ${device.rooms.join(", ")}` : ""}`;
    $(".pick-files", row).setAttribute("aria-label", `Send files to ${device.name}`);
    $(".pick-folder", row).setAttribute("aria-label", `Send a folder to ${device.name}`);
    $(".pick-files", row).addEventListener("change", (e) => sendTo(device.id, [...e.target.files].map((file) => ({ file, path: file.name }))));
    $(".pick-folder", row).addEventListener("change", (e) => sendTo(device.id, [...e.target.files].map((file) => ({ file, path: file.webkitRelativePath || file.name }))));
    row.addEventListener("dragover", (e) => { e.preventDefault(); row.classList.add("drop"); });
    row.addEventListener("dragleave", () => row.classList.remove("drop"));
    row.addEventListener("drop", async (e) => {
      e.preventDefault();
      row.classList.remove("drop");
      sendTo(device.id, await droppedItems(e.dataTransfer));
    });
    const terminal = app.terminals.get(device.id);
    const watch = $(".watch", row);
    watch.hidden = !terminal;
    if (terminal) {
      watch.textContent = `Watch terminal: ${terminal.data.title || terminal.data.session_id}`;
      watch.addEventListener("click", () => watchTerminal(device.id));
    }
    if (device.platform === "guest") row.querySelector(".actions").hidden = true; // reaches only its sender
    list.append(row);
  }
}

async function refreshDevices() {
  try {
    const devices = await app.session.devices();
    app.devices = new Map(devices.map((d) => [d.id, d]));
    renderDevices();
  } catch (err) {
    status(explain(err));
  }
}

function onFrame(frame) {
  switch (frame.type) {
    case "hello":
    case "presence":
      return refreshDevices();
    case "signal":
      return app.peers?.onSignal(frame);
    case "event":
      if (frame.kind === "terminal.session" && frame.from) {
        app.terminals.set(frame.from, frame);
        renderDevices();
      } else if (frame.kind === "terminal.session.ended" && frame.from) {
        if (app.terminals.get(frame.from)?.key === frame.key) app.terminals.delete(frame.from);
        renderDevices();
      } else if (frame.kind?.startsWith("room.")) refreshDevices();
      return undefined;
    case "error":
      return status(`The server refused a message: ${frame.message || frame.error}`);
    default:
      return undefined;
  }
}

// ------------------------------------------------------------------ terminal

async function capabilityInRooms(deviceId, scope, resource, rooms) {
  let last = null;
  for (const room of [...rooms].sort()) {
    try { return await app.session.capability(deviceId, scope, resource, room); } catch (err) { last = err; }
  }
  if (!rooms.length) return app.session.capability(deviceId, scope, resource);
  throw last;
}

async function watchTerminal(deviceId) {
  const announced = app.terminals.get(deviceId);
  if (!announced) return;
  stopWatching();
  const { session_id: sessionId } = announced.data;
  const rooms = announced.rooms || [];
  $("#terminal-section").hidden = false;
  const state = $("#terminal-state");
  const control = $("#terminal-control");
  state.textContent = "Connecting…";
  const term = new Terminal({ convertEol: false, cursorBlink: false, scrollback: 1000, cols: announced.data.cols || 80, rows: announced.data.rows || 24 });
  app.term = term;
  const host = $("#terminal");
  host.replaceChildren();
  term.open(host);
  const decoder = new TextDecoder();
  const screen = {
    write: (bytes) => term.write(filterQueries(decoder.decode(bytes, { stream: true }))),
    reset: () => term.reset(),
    resize: (cols, rows) => term.resize(Math.max(cols, 1), Math.max(rows, 1)),
  };
  try {
    const token = await capabilityInRooms(deviceId, "terminal:view", sessionId, rooms);
    const mesh = await app.peers.dial(deviceId);
    const channel = await mesh.open(StreamRole.TERMINAL, { tokens: [token], resource: sessionId });
    const viewer = new TerminalViewer(channel, screen, {
      onState: (s) => {
        state.textContent = s.you ? "You control this terminal" : `View only${s.controller ? ` (controlled by ${s.controller})` : ""}`;
        control.textContent = s.you ? "Give control back" : "Ask for control";
        control.disabled = false;
      },
      onDenied: (reason) => { state.textContent = `Control refused${reason ? `: ${reason}` : ""}`; control.disabled = false; },
      onEnded: (ended) => { state.textContent = `The session ended${ended.exit_code !== null ? ` (exit ${ended.exit_code})` : ""}`; control.disabled = true; },
    });
    app.viewer = viewer;
    term.onData((data) => viewer.input(data));
    control.onclick = async () => {
      control.disabled = true;
      try {
        if (viewer.you) return await viewer.releaseControl();
        const controlToken = await capabilityInRooms(deviceId, "terminal:control", sessionId, rooms);
        state.textContent = "Asked the host for control…";
        await viewer.requestControl(controlToken);
      } catch (err) {
        state.textContent = `Control refused: ${explain(err)}`;
        control.disabled = false;
      }
    };
    state.textContent = "View only";
    await viewer.run({ cols: term.cols, rows: term.rows });
  } catch (err) {
    state.textContent = `Cannot watch: ${explain(err)}`;
  }
}

function stopWatching() {
  app.viewer?.channel.close().catch(() => {});
  app.viewer = null;
  app.term?.dispose();
  app.term = null;
  $("#terminal-section").hidden = true;
}

/** The terminal's visible text, line by line (what the tests read). */
app.terminalText = () => {
  const buffer = app.term?.buffer.active;
  if (!buffer) return "";
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i)?.translateToString(true) ?? "");
  return lines.join("\n");
};

// ------------------------------------------------------------------ start

const TURN_RETRY_MS = 5 * 60 * 1000;

/** The server's STUN, and for a signed-in device the deployment's TURN (when /info lists
 * turn_urls) with short-lived credentials, replaced in `app.peers` a minute before they expire.
 * A share-link guest gets none (docs/security.md): the sender's agent offers a relayed candidate. */
async function iceServers(session = null) {
  let info;
  try { info = await api.serverInfo(); } catch { return []; }
  const servers = info.stun_port ? [{ urls: `stun:${location.hostname}:${info.stun_port}` }] : [];
  if (!session || session.state.guest || !info.turn_urls?.length) return servers;
  const renew = (ms) => setTimeout(async () => {
    const fresh = await iceServers(session);
    if (app.peers) app.peers.iceServers = fresh;
  }, ms);
  try {
    const turn = await session.turnCredentials();
    servers.push({ urls: turn.urls, username: turn.username, credential: turn.password });
    renew(Math.max(30, turn.expires_at - Date.now() / 1000 - 60) * 1000);
  } catch {
    renew(TURN_RETRY_MS); // no TURN for now: direct paths only until then
  }
  return servers;
}

async function start(session) {
  app.session = session;
  const cert = await api.certificate();
  if (api.fingerprintOf(cert) !== session.deviceId) {
    api.Session.clear(); // the identity is gone (storage cleared): enrol again
    return showLogin();
  }
  show("home");
  $("#account").hidden = false;
  $("#who").textContent = session.user;
  status("Connecting…");
  const askWhere = $("#ask-where");
  askWhere.checked = "showSaveFilePicker" in window && localStorage.getItem("meshagent.ask-where") !== "no";
  askWhere.disabled = !("showSaveFilePicker" in window);
  askWhere.addEventListener("change", () => localStorage.setItem("meshagent.ask-where", askWhere.checked ? "yes" : "no"));
  downloadWorker();
  app.link = new api.Link(session, {
    onFrame,
    onStatus: (text) => {
      status(text === "connected" ? "Connected" : text === "signed out" ? "Signed out: sign in again" : "Reconnecting…");
      if (text === "signed out") signOut();
    },
  });
  app.peers = new Peers({ session, link: app.link, cert, iceServers: await iceServers(session), onChannel });
  $("#terminal-close").addEventListener("click", stopWatching);
  refreshDevices();
  app.link.start();
  app.ready = true;
}

function signOut() {
  app.link?.stop();
  api.Session.clear();
  location.reload();
}

function showLogin() {
  show("login");
  const name = $("#device-name");
  name.value ||= `Browser on ${navigator.platform || "this computer"}`.slice(0, 64);
  const submit = (form, credentials) => form.addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#login-error").textContent = "";
    const button = $("button", form);
    button.disabled = true;
    try {
      const session = await api.Session.enrol(credentials(new FormData(form)), name.value.trim() || "Browser");
      await start(session);
    } catch (err) {
      $("#login-error").textContent = explain(err);
    } finally {
      button.disabled = false;
    }
  });
  submit($("#login-password"), (f) => ({ username: f.get("username").trim(), password: f.get("password") }));
  submit($("#login-code"), (f) => ({ join_code: f.get("join_code").trim() }));
}

/** /s/<link_id>#<secret>: claim the link, then save what the sender's agent sends. */
async function sharePage(linkId, secret) {
  show("share");
  history.replaceState(null, "", location.pathname); // the secret is spent: keep it out of the history
  const what = $("#share-what");
  if (!secret) {
    $("#share-error").textContent = "This link is incomplete: its secret (after #) is missing.";
    return;
  }
  try {
    status("Claiming the link…");
    const { session, cert, link } = await api.claimLink(linkId, secret);
    app.session = session;
    what.textContent = `${link.sender_name || "Someone"} is sending you ${link.name} (${humanSize(link.size)}). It comes straight from their device.`;
    app.receiveInto = { list: $("#share-transfers"), transfers: $("#share-transfers"), senderName: link.sender_name };
    downloadWorker();
    app.link = new api.Link(session, {
      onFrame: (frame) => { if (frame.type === "signal") app.peers.onSignal(frame); },
      onStatus: (text) => status(text === "connected" ? `Waiting for ${link.sender_name || "the sender"}…` : "Reconnecting…"),
    });
    app.peers = new Peers({ session, link: app.link, cert, iceServers: await iceServers(), onChannel });
    app.link.start();
    app.ready = true;
  } catch (err) {
    status("");
    $("#share-error").textContent = explain(err);
  }
}

function main() {
  $("#signout").addEventListener("click", signOut);
  const share = /^\/s\/([A-Za-z0-9_-]{1,128})\/?$/.exec(location.pathname);
  if (share) return sharePage(share[1], location.hash.slice(1));
  const session = api.Session.load();
  return session ? start(session) : showLogin();
}

app.sendTo = sendTo; // for the console (and the browser benchmark)
main();
