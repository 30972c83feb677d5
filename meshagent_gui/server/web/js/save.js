// Where a received file goes, without ever holding a large file in memory (contract item 8):
// 1. the File System Access API (`showSaveFilePicker`), asked while the user's click that
//    accepted the offer still counts, writing each chunk as it is verified;
// 2. else a download stream through the service worker (sw.js): the browser's download
//    manager writes to disk, and the stream's backpressure holds the transfer back;
// 3. else (no service worker: a private window in some browsers) Blob parts, only for files
//    up to BLOB_LIMIT; larger ones are refused with a clear message.
import { randomHex } from "./wire.js";

const BLOB_LIMIT = 256 * 1024 * 1024;
const STREAM_HIGH_WATER = 4 * 1024 * 1024;
let worker = null; // a Promise of the active worker, or of false

/** Registers the download worker (once); resolves to it, or false where there is none. */
export function downloadWorker() {
  worker ??= registerWorker();
  return worker;
}

async function registerWorker() {
  if (!("serviceWorker" in navigator)) return false;
  try {
    // Not `serviceWorker.ready`: that waits for a worker of *this* page's scope, and the
    // share page (/s/...) is outside /app/. The download URLs are inside it.
    const registration = await navigator.serviceWorker.register("/app/sw.js", { scope: "/app/" });
    return registration.active || await new Promise((resolve) => {
      const installing = registration.installing || registration.waiting;
      installing.addEventListener("statechange", () => {
        if (installing.state === "activated") resolve(installing);
      });
    });
  } catch (err) {
    console.info(`no download worker: ${err.message}`);
    return false;
  }
}

/** A sink that streams to the browser's downloads through the service worker. */
export async function downloadSink(name, size) {
  const active = await downloadWorker();
  if (!active) return blobSink(name, size);
  let controller;
  let pulled = null;
  let cancelled = null;
  const stream = new ReadableStream({
    start(c) { controller = c; },
    pull() { const p = pulled; pulled = null; p?.(); },
    cancel(reason) {
      cancelled = new Error(`the download was cancelled${reason ? `: ${reason}` : ""}`);
      const p = pulled; pulled = null; p?.();
    },
  }, new ByteLengthQueuingStrategy({ highWaterMark: STREAM_HIGH_WATER }));
  const id = randomHex(16);
  const ready = new MessageChannel();
  const handed = new Promise((resolve) => { ready.port1.onmessage = resolve; });
  active.postMessage({ type: "download", id, name, size, stream }, [stream, ready.port2]);
  await handed;
  const frame = document.createElement("iframe");
  frame.hidden = true;
  frame.src = `/app/dl/${id}/${encodeURIComponent(name)}`;
  document.body.append(frame);
  setTimeout(() => frame.remove(), 60000);
  return {
    kind: "download",
    async write(bytes) {
      if (cancelled) throw cancelled;
      controller.enqueue(bytes);
      while (controller.desiredSize <= 0 && !cancelled) await new Promise((resolve) => { pulled = resolve; });
      if (cancelled) throw cancelled;
    },
    async close() { controller.close(); },
    async abort(reason) { try { controller.error(new Error(reason || "aborted")); } catch { /* closed */ } },
  };
}

/** A sink writing into a file the user picked (File System Access API). */
export async function pickedFileSink(name) {
  const handle = await window.showSaveFilePicker({ suggestedName: name });
  const writable = await handle.createWritable();
  return {
    kind: "picked",
    write: (bytes) => writable.write(bytes),
    close: () => writable.close(),
    abort: (reason) => writable.abort(reason).catch(() => {}),
  };
}

/** Small files only: the parts are held until the end, then handed to the browser. */
export function blobSink(name, size) {
  if (size > BLOB_LIMIT) throw new Error("This browser cannot stream a download to disk; use a browser with service workers for files this large.");
  const parts = [];
  return {
    kind: "blob",
    async write(bytes) { parts.push(bytes); },
    async close() {
      const url = URL.createObjectURL(new Blob(parts));
      const a = Object.assign(document.createElement("a"), { href: url, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    },
    async abort() { parts.length = 0; },
  };
}

/** The file name to save an offered path as (its last part; folders arrive as one zip). */
export function saveName(path) {
  const base = path.split("/").pop() || "download";
  return base.replace(/[\\:*?"<>|\x00-\x1f]/g, "_");
}
