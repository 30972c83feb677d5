// The page's download streams: a file received over WebRTC is streamed to the browser's own
// download manager (to disk) instead of being held in memory. The page hands this worker a
// ReadableStream (transferred, not copied) under a random id, then opens /app/dl/<id>/<name>;
// the worker answers that request with the stream as an attachment. Nothing else is cached or
// intercepted.
const pending = new Map(); // id -> {stream, name, size}

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("message", (event) => {
  const data = event.data || {};
  if (data.type === "download" && typeof data.id === "string" && data.stream instanceof ReadableStream) {
    pending.set(data.id, { stream: data.stream, name: String(data.name || "download"), size: data.size });
    event.ports[0]?.postMessage({ ready: true });
  }
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  const match = /^\/app\/dl\/([0-9a-f]{32})\//.exec(url.pathname);
  if (!match || url.origin !== self.location.origin) return; // everything else goes to the network
  const entry = pending.get(match[1]);
  pending.delete(match[1]);
  if (!entry) {
    event.respondWith(new Response("This download is no longer available.", { status: 404 }));
    return;
  }
  const ascii = entry.name.replace(/[^\x20-\x7e]|["\\]/g, "_");
  const headers = {
    "Content-Type": "application/octet-stream",
    "Content-Disposition": `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(entry.name)}`,
    "X-Content-Type-Options": "nosniff",
  };
  if (Number.isSafeInteger(entry.size)) headers["Content-Length"] = String(entry.size);
  event.respondWith(new Response(entry.stream, { headers }));
});
