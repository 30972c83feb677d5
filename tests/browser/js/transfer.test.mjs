// The page's transfer receiver and sender against scripted peers (the agent's side of the
// protocol, as core/protocol/transfer.py plays it), hostile ones included.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { webModule, FakeChannel } from "./helpers.mjs";

const tx = await webModule("js/transfer.js");
const wire = await webModule("js/wire.js");
const { createBLAKE3 } = await webModule("vendor/blake3.mjs");
const CS = 16 * 1024;

async function digest(bytes) {
  const h = await createBLAKE3();
  h.init();
  h.update(bytes);
  return h.digest("binary");
}

function memorySinks() {
  const files = new Map();
  const open = async (entry) => {
    const parts = [];
    const sink = {
      write: async (b) => parts.push(Uint8Array.from(b)),
      close: async () => files.set(entry.path, Buffer.concat(parts)),
      abort: async (reason) => files.set(entry.path, `aborted: ${reason}`),
    };
    return sink;
  };
  return { files, open };
}

const entry = (path, size, kind = "file") => ({ path, kind, size, mode: 0o644, mtime_ns: 0, key: new Uint8Array(16) });

async function scriptedSender(channel, files, { corrupt = null } = {}) {
  for (const [index, bytes] of files.entries()) {
    for (let c = 0; c * CS < bytes.length; c++) {
      const data = bytes.subarray(c * CS, (c + 1) * CS);
      const d = await digest(data);
      if (corrupt && corrupt(index, c)) d[0] ^= 1;
      channel.push({ type: "Chunk", index, chunk: c, digest: d, data });
    }
    channel.push({ type: "FileEnd", index, digest: await digest(bytes) });
  }
}

test("receives files in order, checks each digest, reports FileDone and Complete, then closes", async () => {
  const a = randomBytes(CS * 3 + 5);
  const b = new Uint8Array(0);
  const offer = { type: "Offer", transfer_id: "t1", entries: [entry("a.bin", a.length), entry("empty", 0)], total_bytes: a.length, chunk_size: CS };
  const channel = new FakeChannel("t1");
  const progress = [];
  const incoming = new tx.IncomingTransfer(channel, offer, { onProgress: (p) => progress.push(p) });
  const sinks = memorySinks();
  await scriptedSender(channel, [a, b]);
  channel.push(null); // the sender's Close after Complete
  const result = await incoming.accept(sinks.open);
  assert.deepEqual(result, { files: 2, bytes: a.length });
  assert.deepEqual(sinks.files.get("a.bin"), Buffer.from(a));
  assert.equal(sinks.files.get("empty").length, 0);
  const types = channel.types();
  assert.equal(types[0], "Answer");
  assert.deepEqual(types.filter((t) => t !== "Progress"), ["Answer", "FileDone", "FileDone", "Complete"]);
  assert.equal(channel.sent.at(-1).bytes, a.length);
  assert.ok(channel.closed);
  assert.equal(progress.at(-1).bytes, a.length);
});

test("a hostile sender: each violation ends the stream with its code, and the partial is abandoned", async () => {
  const T = tx.TransferErrorCode;
  const bytes = randomBytes(CS * 2);
  const d0 = await digest(bytes.subarray(0, CS));
  const cases = [
    [{ type: "Chunk", index: 5, chunk: 0, digest: d0, data: bytes.subarray(0, CS) }, T.NO_SUCH_ENTRY],
    [{ type: "Chunk", index: 1, chunk: 0, digest: d0, data: bytes.subarray(0, CS) }, T.NOT_A_FILE],
    [{ type: "Chunk", index: 0, chunk: 2, digest: d0, data: bytes.subarray(0, CS) }, T.CHUNK_OUT_OF_RANGE],
    [{ type: "Chunk", index: 0, chunk: 0, digest: d0, data: bytes.subarray(0, CS - 1) }, T.BAD_CHUNK_LENGTH],
    [{ type: "FileEnd", index: 0, digest: d0 }, T.EARLY_FILE_END],
    [{ type: "Offer", transfer_id: "t", entries: [], total_bytes: 0, chunk_size: CS }, wire.ErrorCode.UNEXPECTED_MESSAGE],
  ];
  for (const [message, code] of cases) {
    const offer = { type: "Offer", transfer_id: "t", entries: [entry("x", bytes.length), entry("d", 0, "dir")], total_bytes: bytes.length, chunk_size: CS };
    const channel = new FakeChannel("t");
    const incoming = new tx.IncomingTransfer(channel, offer);
    channel.push(message);
    await assert.rejects(incoming.accept(memorySinks().open), (err) => err.code === code, `code ${code}`);
    assert.equal(channel.aborted.code, code);
  }
});

test("a chunk that fails its digest cancels the transfer; the sink is aborted, never closed", async () => {
  const bytes = randomBytes(CS * 2);
  const offer = { type: "Offer", transfer_id: "t", entries: [entry("x", bytes.length)], total_bytes: bytes.length, chunk_size: CS };
  const channel = new FakeChannel("t");
  const sinks = memorySinks();
  const incoming = new tx.IncomingTransfer(channel, offer);
  await scriptedSender(channel, [bytes], { corrupt: (i, c) => c === 1 });
  await assert.rejects(incoming.accept(sinks.open), /damaged/);
  assert.match(sinks.files.get("x"), /^aborted/);
  assert.ok(channel.types().includes("Cancel"));
});

test("a bad offer is refused before anything is accepted", () => {
  const bad = [
    { transfer_id: "t", entries: [entry("../x", 1)], total_bytes: 1, chunk_size: CS, why: "BAD_PATH?" },
    { transfer_id: "t", entries: [entry("a//b", 1)], total_bytes: 1, chunk_size: CS },
    { transfer_id: "t", entries: [entry("a", 1), entry("a", 1)], total_bytes: 2, chunk_size: CS },
    { transfer_id: "t", entries: [entry("a", 1)], total_bytes: 5, chunk_size: CS },
    { transfer_id: "t", entries: [entry("a", 1)], total_bytes: 1, chunk_size: 10 },
    { transfer_id: "other", entries: [], total_bytes: 0, chunk_size: CS },
    { transfer_id: "t", entries: [{ ...entry("d", 0, "dir"), size: 3 }], total_bytes: 3, chunk_size: CS },
  ];
  // "../x" is syntactically fine (the saver uses only the base name); the rest break a rule.
  assert.doesNotThrow(() => tx.checkOffer({ type: "Offer", ...bad[0] }, "t"));
  for (const offer of bad.slice(1)) assert.throws(() => tx.checkOffer({ type: "Offer", ...offer }, "t"), wire.ProtocolError);
});

test("the receiver's cancel sends Cancel, and the sender's Cancel aborts the partial", async () => {
  const bytes = randomBytes(CS * 2);
  const offer = { type: "Offer", transfer_id: "t", entries: [entry("x", bytes.length)], total_bytes: bytes.length, chunk_size: CS };
  const channel = new FakeChannel("t");
  const sinks = memorySinks();
  const incoming = new tx.IncomingTransfer(channel, offer);
  channel.push({ type: "Chunk", index: 0, chunk: 0, digest: await digest(bytes.subarray(0, CS)), data: bytes.subarray(0, CS) });
  channel.push({ type: "Cancel", reason: "source gone", code: tx.TransferErrorCode.SOURCE_UNREADABLE });
  await assert.rejects(incoming.accept(sinks.open), (err) => err.code === tx.TransferErrorCode.SOURCE_UNREADABLE);
  assert.match(sinks.files.get("x"), /^aborted/);
  const mine = new FakeChannel("u");
  const second = new tx.IncomingTransfer(mine, { ...offer, transfer_id: "u" });
  second.cancel();
  await new Promise((r) => setTimeout(r, 0));
  assert.deepEqual(mine.types(), ["Cancel"]);
});

// ------------------------------------------------------------------ sending

/** A receiver as the agent plays it: answers with `have`, verifies, reports. */
function scriptedReceiver(channel, { have = [], decline = false, resendOnce = null } = {}) {
  const got = new Map();
  const checks = [];
  let offer = null;
  let outstanding = resendOnce ? "armed" : null;
  const ended = new Set();
  const finish = () => {
    for (const index of ended) channel.push({ type: "FileDone", index, ok: true, reason: "" });
    ended.clear();
    const files = offer.entries.filter((e) => e.kind === "file");
    if (channel.sent.filter((s) => s.type === "FileEnd").length === files.length) {
      channel.push({ type: "Complete", files: files.length, bytes: offer.total_bytes });
      channel.push(null);
    }
  };
  channel.onSend = (m) => {
    if (m.type === "Offer") {
      offer = m;
      channel.push(decline ? { type: "Answer", accepted: false, reason: "busy", have: [] } : { type: "Answer", accepted: true, reason: "", have });
    } else if (m.type === "Chunk") {
      checks.push(digest(m.data).then((d) => assert.deepEqual(m.digest, d)));
      if (!got.has(m.index)) got.set(m.index, new Map());
      got.get(m.index).set(m.chunk, m.data);
      if (outstanding === "armed" && m.index === resendOnce[0] && m.chunk === resendOnce[1]) {
        outstanding = "asked";
        channel.push({ type: "Resend", index: m.index, chunk: m.chunk });
      } else if (outstanding === "asked" && m.index === resendOnce[0] && m.chunk === resendOnce[1]) {
        outstanding = null;
        finish();
      }
    } else if (m.type === "FileEnd") {
      ended.add(m.index);
      if (outstanding !== "asked") finish();
    }
  };
  return { got, offer: () => offer, checked: () => Promise.all(checks) };
}

test("sends a folder: folders first, every chunk with its blake3, FileEnd with the file's digest", async () => {
  const a = randomBytes(CS * 2 + 1);
  const b = randomBytes(10);
  const items = [
    { file: new File([a], "a.bin", { lastModified: 1_733_616_000_000 }), path: "top/a.bin" },
    { file: new File([b], "b.txt"), path: "top/sub/b.txt" },
  ];
  const channel = new FakeChannel("tid");
  const receiver = scriptedReceiver(channel);
  const result = await tx.sendFiles(channel, items, { chunkSize: CS });
  assert.deepEqual(result, { files: 2, bytes: a.length + b.length, failed: [], resumed: 0 });
  await receiver.checked();
  const offer = receiver.offer();
  assert.deepEqual(offer.entries.map((e) => [e.path, e.kind]), [["top", "dir"], ["top/sub", "dir"], ["top/a.bin", "file"], ["top/sub/b.txt", "file"]]);
  assert.equal(offer.entries[2].mtime_ns, 1_733_616_000_000n * 1_000_000n);
  assert.equal(Buffer.concat([...receiver.got.get(2).values()]).compare(a), 0);
  const ends = channel.sent.filter((m) => m.type === "FileEnd");
  assert.deepEqual(ends[0].digest, await digest(a));
  assert.ok(channel.closed);
  // Python decodes the Offer (mtime_ns as a 64-bit integer) without complaint: see test_js_protocol.py.
  assert.ok(wire.encode(offer).length > 0);
});

test("resume: chunks the receiver holds are hashed but not sent; a Resend is answered", async () => {
  const a = randomBytes(CS * 3);
  const items = [{ file: new File([a], "a.bin"), path: "a.bin" }];
  const channel = new FakeChannel("tid");
  const receiver = scriptedReceiver(channel, { have: [{ index: 0, chunks: Uint8Array.of(0b011) }], resendOnce: [0, 2] });
  const result = await tx.sendFiles(channel, items, { chunkSize: CS });
  assert.equal(result.resumed, 2 * CS);
  const chunks = channel.sent.filter((m) => m.type === "Chunk").map((m) => m.chunk);
  assert.deepEqual(chunks, [2, 2]);
  assert.deepEqual(channel.sent.find((m) => m.type === "FileEnd").digest, await digest(a));
  assert.equal(receiver.got.get(0).size, 1);
});

test("the same file picked again has the same key (what lets the agent resume it)", async () => {
  const file = new File([randomBytes(100)], "x", { lastModified: 5 });
  const [one] = await tx.buildEntries([{ file, path: "x" }]);
  const [two] = await tx.buildEntries([{ file, path: "x" }]);
  const [other] = await tx.buildEntries([{ file: new File([randomBytes(100)], "x", { lastModified: 6 }), path: "x" }]);
  assert.deepEqual(one.key, two.key);
  assert.notDeepEqual(one.key, other.key);
});

test("declined, cancelled by the user, and a hostile answer each end the send with one clear error", async () => {
  const items = [{ file: new File([randomBytes(CS * 4)], "a"), path: "a" }];
  const declined = new FakeChannel("t");
  scriptedReceiver(declined, { decline: true });
  await assert.rejects(tx.sendFiles(declined, items, { chunkSize: CS }), /declined: busy/);

  const hostile = new FakeChannel("t");
  scriptedReceiver(hostile, { have: [{ index: 0, chunks: Uint8Array.of(0xff) }] }); // bits beyond 4 chunks
  await assert.rejects(tx.sendFiles(hostile, items, { chunkSize: CS }), (err) => err.code === tx.TransferErrorCode.BAD_ANSWER);

  const cancelled = new FakeChannel("t");
  const control = new AbortController();
  cancelled.onSend = (m) => {
    if (m.type === "Offer") cancelled.push({ type: "Answer", accepted: true, reason: "", have: [] });
    if (m.type === "Chunk") control.abort();
  };
  await assert.rejects(tx.sendFiles(cancelled, items, { chunkSize: CS, signal: control.signal }), /cancelled/);
  assert.ok(cancelled.types().includes("Cancel"));
  assert.equal(cancelled.types().filter((t) => t === "Chunk").length, 1);
});

test("a receiver that keeps asking for one chunk gets it MAX_RESENDS times, then a Cancel", async () => {
  const items = [{ file: new File([randomBytes(CS)], "a"), path: "a" }];
  const channel = new FakeChannel("t");
  channel.onSend = (m) => {
    if (m.type === "Offer") channel.push({ type: "Answer", accepted: true, reason: "", have: [] });
    if (m.type === "Chunk") channel.push({ type: "Resend", index: 0, chunk: 0 });
  };
  await assert.rejects(tx.sendFiles(channel, items, { chunkSize: CS }), (err) => err.code === tx.TransferErrorCode.TOO_MANY_RESENDS);
  assert.equal(channel.types().filter((t) => t === "Chunk").length, 1 + tx.MAX_RESENDS);
  assert.equal(channel.sent.find((m) => m.type === "Cancel").code, tx.TransferErrorCode.TOO_MANY_RESENDS);
});

test("a Resend of a chunk already asked for, and Progress beyond the offer, are violations", async () => {
  const items = [{ file: new File([randomBytes(CS * 2)], "a"), path: "a" }];
  const twice = new FakeChannel("t");
  twice.onSend = (m) => {
    if (m.type === "Offer") twice.push({ type: "Answer", accepted: true, reason: "", have: [] });
    if (m.type === "Chunk" && m.chunk === 0) {
      twice.push({ type: "Resend", index: 0, chunk: 0 });
      twice.push({ type: "Resend", index: 0, chunk: 0 });
    }
  };
  await assert.rejects(tx.sendFiles(twice, items, { chunkSize: CS }), (err) => err.code === tx.TransferErrorCode.BAD_RESEND);
  assert.equal(twice.aborted.code, tx.TransferErrorCode.BAD_RESEND);

  const boast = new FakeChannel("t");
  boast.onSend = (m) => {
    if (m.type === "Offer") boast.push({ type: "Answer", accepted: true, reason: "", have: [] });
    if (m.type === "Chunk") boast.push({ type: "Progress", bytes_verified: CS * 3, files_done: 0 });
  };
  await assert.rejects(tx.sendFiles(boast, items, { chunkSize: CS }), (err) => err.code === tx.TransferErrorCode.BAD_REPORT);
  assert.equal(boast.aborted.code, tx.TransferErrorCode.BAD_REPORT);
});
