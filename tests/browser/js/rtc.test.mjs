// The DataChannel transport: records, credit both ways, backpressure, stream numbering.
import { test } from "node:test";
import assert from "node:assert/strict";
import { webModule } from "./helpers.mjs";

const rtc = await webModule("js/rtc.js");

class FakeDataChannel extends EventTarget {
  constructor(label, { protocol = rtc.SUBPROTOCOL, ordered = true } = {}) {
    super();
    this.label = label;
    this.protocol = protocol;
    this.ordered = ordered;
    this.maxRetransmits = null;
    this.maxPacketLifeTime = null;
    this.readyState = "open";
    this.bufferedAmount = 0;
    this.bufferedAmountLowThreshold = 0;
    this.out = [];
  }
  send(data) {
    this.out.push(typeof data === "string" ? data : Uint8Array.from(data));
    if (typeof data !== "string") this.bufferedAmount += data.length;
  }
  close() { this.readyState = "closed"; this.dispatchEvent(new Event("close")); }
  deliver(data) {
    const event = new Event("message");
    event.data = data;
    this.dispatchEvent(event);
  }
  drain() {
    this.bufferedAmount = 0;
    this.dispatchEvent(new Event("bufferedamountlow"));
  }
}

class FakePeerConnection extends EventTarget {
  constructor() { super(); this.created = []; this.connectionState = "connected"; }
  createDataChannel(label, options) {
    const channel = new FakeDataChannel(label, options);
    this.created.push(channel);
    return channel;
  }
  close() { this.closed = true; }
  incoming(channel) {
    const event = new Event("datachannel");
    event.channel = channel;
    this.dispatchEvent(event);
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));

test("records parse as the agent writes them; anything else is refused", () => {
  assert.deepEqual(rtc.parseRecord("credit 4325376"), ["credit", 4325376, null]);
  assert.deepEqual(rtc.parseRecord("close 33 bad token here"), ["close", 33, "bad token here"]);
  assert.deepEqual(rtc.parseRecord("fin"), ["fin", null, null]);
  for (const bad of ["", "FIN", "credit -1", "credit 12345678901234567890", "jump 1", "x".repeat(2000)]) {
    assert.equal(rtc.parseRecord(bad), null, bad);
  }
});

test("a dialer's streams are 0, 4, 8 with the subprotocol; the peer's must be odd", async () => {
  const pc = new FakePeerConnection();
  const control = new FakeDataChannel(rtc.CONTROL_LABEL);
  const conn = new rtc.RtcConnection(pc, control, { dialer: true });
  assert.deepEqual([conn.openStream().id, conn.openStream().id, conn.openStream().id], [0, 4, 8]);
  assert.ok(pc.created.every((c) => c.protocol === rtc.SUBPROTOCOL && c.ordered));
  const seen = [];
  conn.onStream = (s) => seen.push(s.id);
  pc.incoming(new FakeDataChannel("mesh-stream/1"));
  assert.deepEqual(seen, [1]);
  pc.incoming(new FakeDataChannel("mesh-stream/4")); // our parity: a protocol error
  assert.match(control.out.at(-1), /^close 1 /);
  assert.ok(conn.closedError);
});

test("an unordered channel, a wrong subprotocol or a bad control record closes the connection", () => {
  for (const make of [
    () => new FakeDataChannel("mesh-stream/1", { ordered: false }),
    () => new FakeDataChannel("mesh-stream/1", { protocol: "other" }),
    () => new FakeDataChannel("something"),
  ]) {
    const pc = new FakePeerConnection();
    const control = new FakeDataChannel(rtc.CONTROL_LABEL);
    const conn = new rtc.RtcConnection(pc, control, { dialer: true });
    pc.incoming(make());
    assert.ok(conn.closedError);
  }
  const pc = new FakePeerConnection();
  const control = new FakeDataChannel(rtc.CONTROL_LABEL);
  const conn = new rtc.RtcConnection(pc, control, { dialer: true });
  control.deliver("ping 7");
  assert.deepEqual(control.out, ["pong 7"]);
  control.deliver("close 33 no token");
  assert.equal(conn.closedError.code, 33);
  assert.equal(conn.closedError.message, "no token");
});

test("writes stop at the peer's credit (128 KiB first) and at 1 MiB buffered, and resume", async () => {
  const pc = new FakePeerConnection();
  const conn = new rtc.RtcConnection(pc, new FakeDataChannel(rtc.CONTROL_LABEL), { dialer: true });
  const stream = conn.openStream();
  const channel = pc.created[0];
  let done = false;
  const writing = stream.write(new Uint8Array(2 * 1024 * 1024)).then(() => { done = true; });
  await tick();
  const sent = () => channel.out.reduce((n, m) => n + (typeof m === "string" ? 0 : m.length), 0);
  assert.equal(sent(), rtc.INITIAL_CREDIT);
  assert.ok(channel.out.every((m) => m.length <= rtc.MAX_MESSAGE));
  channel.deliver(`credit ${4 * 1024 * 1024}`);
  await tick();
  assert.equal(sent(), rtc.MAX_UNSENT + rtc.MAX_MESSAGE); // stopped once over 1 MiB buffered
  assert.equal(done, false);
  channel.drain();
  await tick();
  channel.drain();
  await writing;
  assert.equal(sent(), 2 * 1024 * 1024);
});

test("credit is granted as the reader takes bytes; writing past it closes the connection", async () => {
  const pc = new FakePeerConnection();
  const control = new FakeDataChannel(rtc.CONTROL_LABEL);
  const conn = new rtc.RtcConnection(pc, control, { dialer: false });
  let stream = null;
  conn.onStream = (s) => { stream = s; };
  const channel = new FakeDataChannel("mesh-stream/0");
  pc.incoming(channel);
  channel.deliver(new Uint8Array(64 * 1024).buffer);
  assert.deepEqual(channel.out, []); // nothing read yet: no credit beyond the first 128 KiB
  const KiB64 = 64 * 1024;
  let consumed = 0;
  for (let i = 0; i < 100; i++) {
    await stream.read();
    consumed += KiB64;
    channel.deliver(new Uint8Array(KiB64).buffer);
  }
  const grants = channel.out.map((r) => Number(r.split(" ")[1]));
  assert.equal(grants[0], KiB64 + rtc.STREAM_WINDOW); // granted as the first bytes are taken
  for (let i = 1; i < grants.length; i++) assert.ok(grants[i] - grants[i - 1] >= rtc.STREAM_WINDOW / 2);
  assert.ok(grants.at(-1) <= consumed + rtc.STREAM_WINDOW);
  assert.ok(grants.at(-1) > consumed + rtc.STREAM_WINDOW / 2);
  // a peer that ignores its credit
  const greedy = new FakeDataChannel("mesh-stream/4");
  pc.incoming(greedy);
  greedy.deliver(new Uint8Array(rtc.INITIAL_CREDIT + 1).buffer);
  assert.ok(conn.closedError);
  assert.match(control.out.at(-1), /^close 1 the peer wrote past its credit/);
});

test("fin, reset and stop: a Channel sees a graceful end, a truncation, and a reset", async () => {
  const pc = new FakePeerConnection();
  const conn = new rtc.RtcConnection(pc, new FakeDataChannel(rtc.CONTROL_LABEL), { dialer: true });
  const { encode } = await webModule("js/wire.js");
  const graceful = new rtc.Channel(conn.openStream());
  pc.created[0].deliver(encode({ type: "Close", code: 0, message: "" }).buffer);
  pc.created[0].deliver("fin");
  assert.equal(await graceful.receive(), null);
  const cut = new rtc.Channel(conn.openStream());
  pc.created[1].deliver("fin");
  await assert.rejects(cut.receive(), (err) => err.code === 0x15);
  const reset = new rtc.Channel(conn.openStream());
  pc.created[2].deliver("reset 3");
  await assert.rejects(reset.receive(), (err) => err.code === 3);
  const stopped = conn.openStream();
  pc.created[3].deliver("stop 3");
  assert.equal(pc.created[3].out.at(-1), "reset 3");
  await assert.rejects(stopped.write(new Uint8Array(1)), (err) => err.code === 3);
});
