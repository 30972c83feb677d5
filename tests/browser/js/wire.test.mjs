// The wire format against the Python implementation's vectors (tests/browser/vectors.py).
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { webModule, loadVectors, fromHex, toHex } from "./helpers.mjs";

const wire = await webModule("js/wire.js");
const vectors = loadVectors();

function strip(message) {
  const { frameBytes, ...rest } = message;
  return rest;
}

function normalise(value) {
  // Numbers and BigInts compare by value; views compare by content.
  if (typeof value === "bigint") return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
  if (value instanceof Uint8Array) return toHex(value);
  if (Array.isArray(value)) return value.map(normalise);
  if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, normalise(v)]));
  return value;
}

test("every Python frame decodes into the expected message", () => {
  for (const { name, frame, message } of vectors) {
    const decoder = new wire.FrameDecoder();
    const [decoded] = decoder.receive(fromHex(frame));
    assert.deepEqual(normalise(strip(decoded)), normalise(message), name);
    assert.equal(decoded.frameBytes, frame.length / 2);
  }
});

test("frames split anywhere decode the same", () => {
  const all = fromHex(vectors.map((v) => v.frame).join(""));
  for (const step of [1, 3, 7, 64, 1000]) {
    const decoder = new wire.FrameDecoder();
    const out = [];
    for (let at = 0; at < all.length; at += step) out.push(...decoder.receive(all.subarray(at, at + step)));
    assert.equal(out.length, vectors.length, `step ${step}`);
    out.forEach((m, i) => assert.deepEqual(normalise(strip(m)), normalise(vectors[i].message), `${vectors[i].name} step ${step}`));
    assert.equal(decoder.bufferedBytes, 0);
  }
});

test("encoding each message gives the Python bytes", () => {
  const mine = {};
  for (const { name, frame, message } of vectors) {
    const encoded = wire.encode(message);
    mine[name] = toHex(encoded);
    assert.equal(toHex(encoded), frame, name);
  }
  if (process.env.MESH_JS_FRAMES) writeFileSync(process.env.MESH_JS_FRAMES, JSON.stringify(mine));
});

test("a bulk message's data is not copied into its frame", () => {
  const data = new Uint8Array(1024 * 1024);
  const [head, body] = wire.encodeParts({ type: "Chunk", index: 0, chunk: 0, digest: new Uint8Array(32), data });
  assert.equal(body, data);
  assert.equal(head.length, 8 + 40);
});

test("garbage: every header rule is a ProtocolError with its code, and the decoder stays broken", () => {
  const C = wire.ErrorCode;
  const header = (version, flags, type, length) => {
    const b = new Uint8Array(8);
    const v = new DataView(b.buffer);
    v.setUint8(0, version); v.setUint8(1, flags); v.setUint16(2, type); v.setUint32(4, length);
    return b;
  };
  const cases = [
    [header(2, 0, 1, 0), C.UNSUPPORTED_FRAME_VERSION],
    [header(1, 0, 0x0999, 0), C.UNKNOWN_MESSAGE_TYPE],
    [header(1, 0, 0, 0), C.UNKNOWN_MESSAGE_TYPE],
    [header(1, 0x01, 0x0102, 40), C.BAD_FLAGS],
    [header(1, 0, 0x0102, 0xffffffff), C.FRAME_TOO_LARGE],
    [header(1, 0, 0x0001, 48 * 1024 + 1), C.FRAME_TOO_LARGE],
    [header(1, 0x80, 0x0999, 64 * 1024 + 1), C.FRAME_TOO_LARGE],
    [Uint8Array.from([...header(1, 0, 0x0002, 1), 0xc1]), C.BAD_MESSAGE], // 0xc1: never used in msgpack
    [Uint8Array.from([...header(1, 0, 0x0002, 1), 0x90]), C.BAD_MESSAGE], // an array, not a map
    [Uint8Array.from([...header(1, 0, 0x0104, 4), 0, 0, 0, 0]), C.BAD_MESSAGE], // struct too short
  ];
  for (const [bytes, code] of cases) {
    const decoder = new wire.FrameDecoder();
    assert.throws(() => decoder.receive(bytes), (err) => err instanceof wire.ProtocolError && err.code === code, toHex(bytes));
    assert.throws(() => decoder.receive(new Uint8Array(0)), wire.ProtocolError);
  }
});

test("a hostile length costs nothing until the bytes arrive", () => {
  const decoder = new wire.FrameDecoder();
  const head = wire.encodeParts({ type: "Chunk", index: 0, chunk: 0, digest: new Uint8Array(32), data: new Uint8Array(4 * 1024 * 1024) })[0];
  assert.deepEqual(decoder.receive(head), []);
  assert.equal(decoder.bufferedBytes, head.length - 8); // the header claims 4 MiB: only 40 bytes are held
});

test("bounds are checked on decode: a Hello with nine tokens, a reason over 1 KiB, a wrong field type", () => {
  // A reason's bound counts code points, as msgspec does: 1024 emoji (2048 UTF-16 units) fit.
  const [emoji] = new wire.FrameDecoder().receive(wire.encode({ type: "Close", code: 0, message: "\u{1F600}".repeat(1024) }));
  assert.equal([...emoji.message].length, 1024);
  assert.throws(() => wire.encode({ type: "Close", code: 0, message: "\u{1F600}".repeat(1025) }), wire.ProtocolError);
  assert.throws(() => wire.encode({ type: "Hello", versions: [1], role: 0, tokens: Array(9).fill("t"), resource: "" }), wire.ProtocolError);
  assert.throws(() => wire.encode({ type: "Close", code: 0, message: "x".repeat(1025) }), wire.ProtocolError);
  assert.throws(() => wire.encode({ type: "FileDone", index: -1, ok: true, reason: "" }), wire.ProtocolError);
});

test("an unknown IGNORABLE frame is skipped, an unknown field ignored, a missing one defaulted", async () => {
  const { encode } = await webModule("vendor/msgpack.mjs");
  const skip = new Uint8Array(8 + 5);
  new DataView(skip.buffer).setUint32(0, 0x01800999);
  new DataView(skip.buffer).setUint32(4, 5);
  const payload = encode({ code: 3, extra: [1, 2], message: "m" });
  const close = new Uint8Array(8 + payload.length);
  new DataView(close.buffer).setUint32(0, 0x01000004);
  new DataView(close.buffer).setUint32(4, payload.length);
  close.set(payload, 8);
  const partial = encode({ code: 5 });
  const err = new Uint8Array(8 + partial.length);
  new DataView(err.buffer).setUint32(0, 0x01000005);
  new DataView(err.buffer).setUint32(4, partial.length);
  err.set(partial, 8);
  const out = new wire.FrameDecoder().receive(Uint8Array.from([...skip, ...close, ...err]));
  assert.deepEqual(out.map(strip), [{ type: "Close", code: 3, message: "m" }, { type: "Error", code: 5, message: "" }]);
});
