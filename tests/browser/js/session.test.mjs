// The handshake and channels over two linked in-memory DataChannel stacks: the page as dialer
// and as listener, a refused token, streams both ways on one connection.
import { test } from "node:test";
import assert from "node:assert/strict";
import { webModule } from "./helpers.mjs";

const rtc = await webModule("js/rtc.js");
const { ErrorCode, StreamRole } = await webModule("js/wire.js");

class LinkedChannel extends EventTarget {
  constructor(label, options) {
    super();
    this.label = label;
    this.protocol = options?.protocol ?? "";
    this.ordered = options?.ordered ?? true;
    this.maxRetransmits = null;
    this.maxPacketLifeTime = null;
    this.readyState = "open";
    this.bufferedAmount = 0;
    this.bufferedAmountLowThreshold = 0;
    this.peer = null;
  }
  send(data) {
    const copy = typeof data === "string" ? data : Uint8Array.from(data).buffer;
    queueMicrotask(() => {
      const event = new Event("message");
      event.data = copy;
      this.peer.dispatchEvent(event);
    });
  }
  close() {
    for (const side of [this, this.peer]) {
      if (side.readyState !== "closed") {
        side.readyState = "closed";
        side.dispatchEvent(new Event("close"));
      }
    }
  }
}

class LinkedPeer extends EventTarget {
  constructor() { super(); this.connectionState = "connected"; this.other = null; }
  createDataChannel(label, options) {
    const mine = new LinkedChannel(label, options);
    const theirs = new LinkedChannel(label, options);
    mine.peer = theirs;
    theirs.peer = mine;
    queueMicrotask(() => {
      const event = new Event("datachannel");
      event.channel = theirs;
      this.other.dispatchEvent(event);
    });
    return mine;
  }
  close() { this.closed = true; }
}

function pair({ validate = async () => {}, onChannel = () => true } = {}) {
  const a = new LinkedPeer();
  const b = new LinkedPeer();
  a.other = b;
  b.other = a;
  const control = a.createDataChannel(rtc.CONTROL_LABEL, { protocol: rtc.SUBPROTOCOL });
  const dialer = new rtc.RtcConnection(a, control, { dialer: true });
  const listener = new rtc.RtcConnection(b, null, { dialer: false });
  const accepted = rtc.acceptSession(listener, { validate, onChannel });
  return { dialer, listener, accepted };
}

test("dial, accept, and a stream each way with messages and a graceful close", async () => {
  const seen = [];
  const { dialer, listener, accepted } = pair({
    validate: async (hello) => { assert.deepEqual(hello.tokens, ["tok"]); },
    onChannel: (hello, channel) => () => {
      seen.push([hello.role, hello.resource]);
      channel.receive().then(async (m) => {
        seen.push(m.type);
        await channel.send({ type: "Progress", bytes_verified: 5, files_done: 1 });
        await channel.close();
      });
    },
  });
  const [mine, theirs] = await Promise.all([rtc.dialSession(dialer, ["tok"]), accepted]);
  const channel = await mine.open(StreamRole.TRANSFER, { tokens: ["share"], resource: "t1" });
  await channel.send({ type: "Resend", index: 1, chunk: 2 });
  const progress = await channel.receive();
  assert.equal(progress.bytes_verified, 5);
  assert.equal(await channel.receive(), null); // the peer's Close
  await channel.close();
  assert.deepEqual(seen, [[StreamRole.TRANSFER, "t1"], "Resend"]);
  // The listener opens a stream on the same connection (an agent sending to the page).
  let served = null;
  dialer.onStream = (stream) => rtc.serveStream(dialer, stream, (hello, ch) => () => { served = [hello.resource, ch]; });
  const back = await theirs.open(StreamRole.TRANSFER, { tokens: ["x"], resource: "t2" });
  assert.equal(back.stream.id % 4, 1);
  await back.send({ type: "Complete", files: 0, bytes: 0 });
  while (!served) await new Promise((r) => setTimeout(r, 1));
  assert.equal(served[0], "t2");
  assert.equal((await served[1].receive()).type, "Complete");
  assert.equal(listener.closedError, null);
});

test("a refused token: the dialer hears the code, and the connection closes", async () => {
  const { dialer, accepted } = pair({
    validate: async () => { throw Object.assign(new Error("not for you"), { code: ErrorCode.NOT_ALLOWED }); },
  });
  const dialing = rtc.dialSession(dialer, ["stolen"]);
  await assert.rejects(dialing, (err) => err instanceof rtc.HandshakeRefused && err.code === ErrorCode.NOT_ALLOWED);
  await assert.rejects(accepted, (err) => err.code === ErrorCode.NOT_ALLOWED);
});

test("a stream the page does not want is refused, and the connection lives on", async () => {
  const { dialer, accepted } = pair({ onChannel: () => false });
  const [mine] = await Promise.all([rtc.dialSession(dialer, ["tok"]), accepted]);
  await assert.rejects(mine.open(StreamRole.SYNC, { tokens: ["t"], resource: "f" }), (err) => err.code === ErrorCode.REFUSED);
  assert.equal(dialer.closedError, null);
});

test("a first stream that is not the control stream closes the connection", async () => {
  const a = new LinkedPeer();
  const b = new LinkedPeer();
  a.other = b;
  b.other = a;
  const dialer = new rtc.RtcConnection(a, a.createDataChannel(rtc.CONTROL_LABEL, { protocol: rtc.SUBPROTOCOL }), { dialer: true });
  const listener = new rtc.RtcConnection(b, null, { dialer: false });
  const accepted = rtc.acceptSession(listener, { validate: async () => {}, onChannel: () => true });
  const channel = new rtc.Channel(dialer.openStream());
  await channel.send({ type: "Hello", versions: [1], role: StreamRole.TRANSFER, tokens: [], resource: "" });
  await assert.rejects(accepted, (err) => err.code === ErrorCode.PROTOCOL_ERROR);
  assert.ok(listener.closedError);
});
