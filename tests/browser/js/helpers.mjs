// Shared by the node tests: the modules under test, the Python-written vectors, a fake channel.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const here = dirname(fileURLToPath(import.meta.url));
export const WEB = join(here, "..", "..", "..", "meshagent_gui", "server", "web");
export const webModule = (name) => import(join(WEB, name));

/** The vectors (tests/browser/vectors.py), with bytes and big integers revived. */
export function loadVectors() {
  const path = process.env.MESH_VECTORS;
  if (!path) throw new Error("MESH_VECTORS is not set: run these through tests/browser/test_js_protocol.py");
  return JSON.parse(readFileSync(path, "utf8"), (key, value) => {
    if (value && typeof value === "object" && "$bytes" in value) return Uint8Array.from(Buffer.from(value.$bytes, "hex"));
    if (value && typeof value === "object" && "$int" in value) return BigInt(value.$int);
    return value;
  });
}

export const fromHex = (hex) => Uint8Array.from(Buffer.from(hex, "hex"));
export const toHex = (bytes) => Buffer.from(bytes).toString("hex");

/** A Channel stand-in: what the code under test sends is kept; `push` feeds what it receives. */
export class FakeChannel {
  constructor(resource = "") {
    this.resource = resource;
    this.sent = [];
    this.inbox = [];
    this.waiting = null;
    this.closed = false;
    this.aborted = null;
  }
  async send(message) {
    // Copy the data: the sender may reuse its buffers after send resolves.
    const copy = { ...message };
    if (copy.data) copy.data = Uint8Array.from(copy.data);
    this.sent.push(copy);
    this.onSend?.(copy);
  }
  push(message) {
    this.inbox.push(message);
    const w = this.waiting;
    this.waiting = null;
    if (w) w();
  }
  async receive() {
    while (!this.inbox.length) await new Promise((resolve) => { this.waiting = resolve; });
    const message = this.inbox.shift();
    if (message instanceof Error) throw message;
    return message;
  }
  async close() { this.closed = true; }
  async abort(code, message) { this.aborted = { code, message }; }
  types() { return this.sent.map((m) => m.type); }
}
