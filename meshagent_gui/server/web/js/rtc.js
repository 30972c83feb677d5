// The session protocol over WebRTC DataChannels (docs/protocol.md "WebRTC transport"), the
// browser's side of core/p2p/webrtc.py: one ordered, reliable DataChannel per stream (label
// `mesh-stream/<id>`, subprotocol `meshagent/1`), binary messages = stream bytes, text
// messages = the stream's records (fin, reset, stop, credit), and `mesh-control` for ping,
// pong and close. Above it, the handshake (Hello / HandshakeAccepted / HandshakeRefused) and
// Channels that send and receive messages.
//
// Memory: a stream grants the peer credit only for bytes its reader took, so a page that stops
// reading (a slow disk) stops the sender after at most one window (4 MiB).
import { encodeParts, FrameDecoder, ProtocolError, ErrorCode, StreamRole, PROTOCOL_VERSION } from "./wire.js";

export const SUBPROTOCOL = "meshagent/1";
export const CONTROL_LABEL = "mesh-control";
export const STREAM_LABEL = "mesh-stream/";
export const INITIAL_CREDIT = 128 * 1024;
export const STREAM_WINDOW = 4 * 1024 * 1024;
export const MAX_UNSENT = 1024 * 1024;
export const MAX_MESSAGE = 64 * 1024;
export const MAX_STREAMS = 128;
const RECORD = /^(fin|reset|stop|credit|ping|pong|close)(?: (\d{1,19}))?(?: ([\s\S]*))?$/;

/** The connection ended: `code` is the protocol's (or the peer's close record's). */
export class ConnectionClosed extends Error {
  constructor(code, reason) {
    super(reason || `connection closed (${code})`);
    this.name = "ConnectionClosed";
    this.code = code;
  }
}

/** A stream ended without a graceful Close (reset, truncation, the peer's Error). */
export class ChannelClosed extends Error {
  constructor(code, reason) {
    super(reason || `stream closed (${code})`);
    this.name = "ChannelClosed";
    this.code = code;
  }
}

export class HandshakeRefused extends Error {
  constructor(code, reason) {
    super(reason || `refused (${code})`);
    this.name = "HandshakeRefused";
    this.code = code;
  }
}

/** Parses one text record: [verb, number | null, rest | null], or null when malformed. */
export function parseRecord(text) {
  if (text.length > 1100) return null;
  const m = RECORD.exec(text);
  if (!m) return null;
  const [, verb, number, rest] = m;
  if (rest !== undefined && verb !== "close") return null;
  return [verb, number === undefined ? null : Number(number), rest === undefined ? null : rest];
}

/** Resolves once `channel` is open (or throws if it closes first). */
function opened(channel) {
  if (channel.readyState === "open") return Promise.resolve();
  return new Promise((resolve, reject) => {
    channel.addEventListener("open", () => resolve(), { once: true });
    channel.addEventListener("close", () => reject(new ChannelClosed(ErrorCode.GOING_AWAY, "channel closed")), { once: true });
  });
}

/** One bidirectional stream on its own DataChannel, with credit both ways. */
export class RtcStream {
  constructor(connection, channel, id, { local }) {
    this.connection = connection;
    this.channel = channel;
    this.id = id;
    this.local = local;
    channel.binaryType = "arraybuffer";
    channel.bufferedAmountLowThreshold = MAX_UNSENT / 2;
    // receive side
    this._queue = [];
    this._received = 0;
    this._consumed = 0;
    this._granted = INITIAL_CREDIT;
    this._finReceived = false;
    this._resetCode = null;
    this._waiter = null;
    // send side
    this._written = 0;
    this._peerLimit = INITIAL_CREDIT;
    this._sentEnd = false;
    this._stopCode = null;
    this._sendWaiter = null;
    this._closed = false;
    channel.addEventListener("message", (event) => this._onMessage(event.data));
    channel.addEventListener("bufferedamountlow", () => this._wakeSender());
    channel.addEventListener("close", () => this._onClose());
  }

  _onMessage(data) {
    if (typeof data === "string") {
      const record = parseRecord(data);
      if (!record) return this.connection.fail(ErrorCode.PROTOCOL_ERROR, "malformed stream record");
      const [verb, number] = record;
      if (verb === "fin") this._finReceived = true;
      else if (verb === "reset" && number !== null) this._resetCode = number;
      else if (verb === "stop" && number !== null) {
        this._stopCode = number;
        this.reset(number);
      } else if (verb === "credit" && number !== null) {
        if (number > this._peerLimit) this._peerLimit = number;
        this._wakeSender();
      } else return this.connection.fail(ErrorCode.PROTOCOL_ERROR, `record ${verb} on a stream`);
      this._wakeReader();
      return;
    }
    if (this._finReceived || this._resetCode !== null) {
      return this.connection.fail(ErrorCode.PROTOCOL_ERROR, "data after the end of a stream");
    }
    const bytes = new Uint8Array(data);
    this._received += bytes.length;
    if (this._received > this._granted) {
      return this.connection.fail(ErrorCode.PROTOCOL_ERROR, "the peer wrote past its credit");
    }
    this._queue.push(bytes);
    this._wakeReader();
  }

  _onClose() {
    this._closed = true;
    if (!this._finReceived && this._resetCode === null) this._resetCode = ErrorCode.GOING_AWAY;
    this._wakeReader();
    this._wakeSender();
  }

  _wakeReader() {
    const waiter = this._waiter;
    this._waiter = null;
    if (waiter) waiter();
  }

  _wakeSender() {
    const waiter = this._sendWaiter;
    this._sendWaiter = null;
    if (waiter) waiter();
  }

  /** The next piece of the stream's bytes, or null at its end (after the peer's fin). */
  async read() {
    for (;;) {
      if (this._queue.length) {
        const bytes = this._queue.shift();
        this._consumed += bytes.length;
        this._maybeGrant();
        return bytes;
      }
      if (this._resetCode !== null) throw new ChannelClosed(this._resetCode, "the peer reset the stream");
      if (this._finReceived) {
        this._checkFinished();
        return null;
      }
      if (this.connection.closedError) throw this.connection.closedError;
      await new Promise((resolve) => { this._waiter = resolve; });
    }
  }

  _maybeGrant() {
    const limit = this._consumed + STREAM_WINDOW;
    if (limit - this._granted >= STREAM_WINDOW / 2 && !this._finReceived && !this._closed) {
      this._granted = limit;
      this._send(`credit ${limit}`);
    }
  }

  _send(data) {
    if (this.channel.readyState === "open") this.channel.send(data);
  }

  /** Writes `bytes`, waiting for the peer's credit and for the channel's buffer to drain. */
  async write(bytes) {
    await opened(this.channel);
    let at = 0;
    while (at < bytes.length) {
      if (this._stopCode !== null || this._sentEnd) throw new ChannelClosed(this._stopCode ?? ErrorCode.GOING_AWAY, "the stream's sending side ended");
      if (this._closed) throw new ChannelClosed(ErrorCode.GOING_AWAY, "the channel closed");
      if (this.connection.closedError) throw this.connection.closedError;
      const room = this._peerLimit - this._written;
      if (room <= 0 || this.channel.bufferedAmount > MAX_UNSENT) {
        await new Promise((resolve) => { this._sendWaiter = resolve; });
        continue;
      }
      const n = Math.min(room, MAX_MESSAGE, bytes.length - at);
      this.channel.send(bytes.subarray(at, at + n));
      this._written += n;
      at += n;
    }
  }

  /** Ends our direction (after the session's Close or Error). */
  async fin() {
    if (this._sentEnd) return;
    await opened(this.channel).catch(() => {});
    this._sentEnd = true;
    this._send("fin");
    this._checkFinished();
  }

  reset(code) {
    if (this._sentEnd) return;
    this._sentEnd = true;
    this._send(`reset ${code}`);
    this._checkFinished();
  }

  stop(code) {
    this._send(`stop ${code}`);
  }

  _checkFinished() {
    if (this._sentEnd && (this._finReceived || this._resetCode !== null) && this.channel.readyState === "open") {
      // Both directions ended: free the SCTP stream (queued data still goes first).
      this.channel.close();
    }
  }
}

/**
 * A WebRTC connection's streams: the dialer's are 0, 4, 8, ... and the listener's 1, 5, 9, ...
 * `onStream(stream)` is called for each stream the peer opens.
 */
export class RtcConnection {
  constructor(pc, control, { dialer, onStream = () => {}, onClose = () => {} }) {
    this.pc = pc;
    this.control = control;
    this.dialer = dialer;
    this.onStream = onStream;
    this.onClose = onClose;
    this.streams = new Map();
    this.closedError = null;
    this._nextId = dialer ? 0 : 1;
    this._pings = new Map();
    this._nextPing = 1;
    if (control) this._adoptControl(control); // a listener adopts the dialer's when it arrives
    pc.addEventListener("datachannel", (event) => this._onDatachannel(event.channel));
    pc.addEventListener("connectionstatechange", () => {
      if (["failed", "closed"].includes(pc.connectionState)) this._closed(ErrorCode.GOING_AWAY, `connection ${pc.connectionState}`);
    });
  }

  _adoptControl(channel) {
    this.control = channel;
    channel.addEventListener("message", (event) => this._onControl(event.data));
    channel.addEventListener("close", () => this._closed(ErrorCode.GOING_AWAY, "the control channel closed"));
  }

  _onControl(data) {
    const record = typeof data === "string" ? parseRecord(data) : null;
    if (!record) return this.fail(ErrorCode.PROTOCOL_ERROR, "malformed control record");
    const [verb, number, rest] = record;
    if (verb === "ping" && number !== null) this.control.send(`pong ${number}`);
    else if (verb === "pong" && number !== null) {
      const entry = this._pings.get(number);
      if (entry) {
        this._pings.delete(number);
        entry(performance.now());
      }
    } else if (verb === "close" && number !== null) this._closed(number, rest || "closed by the peer", true);
    else this.fail(ErrorCode.PROTOCOL_ERROR, `record ${verb} on the control channel`);
  }

  _onDatachannel(channel) {
    if (this.closedError) return channel.close();
    if (channel.label === CONTROL_LABEL && !this.dialer && !this._controlSeen) {
      this._controlSeen = true;
      return this._adoptControl(channel);
    }
    const match = /^mesh-stream\/(\d{1,19})$/.exec(channel.label);
    const id = match ? Number(match[1]) : NaN;
    const theirs = this.dialer ? 1 : 0;
    if (!match || id % 4 !== theirs || this.streams.has(id) || channel.protocol !== SUBPROTOCOL
        || !channel.ordered || channel.maxRetransmits !== null || channel.maxPacketLifeTime !== null) {
      return this.fail(ErrorCode.PROTOCOL_ERROR, `unexpected data channel ${channel.label}`);
    }
    if (this.streams.size >= MAX_STREAMS) return this.fail(ErrorCode.PROTOCOL_ERROR, "too many streams");
    const stream = new RtcStream(this, channel, id, { local: false });
    this._track(stream);
    this.onStream(stream);
  }

  _track(stream) {
    this.streams.set(stream.id, stream);
    stream.channel.addEventListener("close", () => this.streams.delete(stream.id));
  }

  /** A new stream of ours. */
  openStream() {
    if (this.closedError) throw this.closedError;
    const id = this._nextId;
    this._nextId += 4;
    const channel = this.pc.createDataChannel(`${STREAM_LABEL}${id}`, { ordered: true, protocol: SUBPROTOCOL });
    const stream = new RtcStream(this, channel, id, { local: true });
    this._track(stream);
    return stream;
  }

  async ping() {
    const id = this._nextPing++;
    const start = performance.now();
    const done = new Promise((resolve) => this._pings.set(id, resolve));
    this.control.send(`ping ${id}`);
    return (await done) - start;
  }

  /** The peer broke the protocol: tell it why and end. */
  fail(code, reason) {
    this.close(code, reason);
  }

  close(code = ErrorCode.NO_ERROR, reason = "") {
    if (this.closedError) return;
    try {
      if (this.control?.readyState === "open") this.control.send(`close ${code} ${reason.slice(0, 1024)}`);
    } catch { /* closing anyway */ }
    this._closed(code, reason);
    // Give the close record a moment to leave: pc.close() aborts SCTP at once.
    setTimeout(() => this.pc.close(), 300);
  }

  _closed(code, reason, byPeer = false) {
    if (this.closedError) return;
    this.closedError = new ConnectionClosed(code, reason);
    this.closedError.byPeer = byPeer;
    for (const stream of this.streams.values()) {
      stream._wakeReader();
      stream._wakeSender();
    }
    if (byPeer) setTimeout(() => this.pc.close(), 0);
    this.onClose(this.closedError);
  }
}

// ------------------------------------------------------------------ session and channels

/**
 * One stream as a message channel: `send(message)`, `receive()`, `close()`, `abort(code)`.
 * `receive()` returns null after the peer's Close (graceful end) and throws ChannelClosed when
 * the stream ends any other way.
 */
export class Channel {
  constructor(stream, { role, resource = "" } = {}) {
    this.stream = stream;
    this.role = role;
    this.resource = resource;
    this.decoder = new FrameDecoder();
    this._pending = [];
    this._peerClosed = false;
    this._sentClose = false;
  }

  async send(message) {
    const [head, data] = encodeParts(message);
    await this.stream.write(head);
    if (data) await this.stream.write(data);
  }

  /** The next message, or null once the peer closed its direction gracefully. */
  async receive() {
    for (;;) {
      if (this._pending.length) {
        const message = this._pending.shift();
        if (message.type === "Close") {
          this._peerClosed = true;
          return null;
        }
        if (message.type === "Error") throw new ChannelClosed(message.code, message.message || "the peer gave up");
        return message;
      }
      if (this._peerClosed) return null;
      let bytes;
      try {
        bytes = await this.stream.read();
      } catch (err) {
        throw err instanceof ChannelClosed ? err : new ChannelClosed(err.code ?? ErrorCode.GOING_AWAY, err.message);
      }
      if (bytes === null) throw new ChannelClosed(ErrorCode.TRUNCATED, "the stream ended without a Close");
      try {
        this._pending.push(...this.decoder.receive(bytes));
      } catch (err) {
        if (err instanceof ProtocolError) this.stream.connection.fail(err.code, err.message);
        throw new ChannelClosed(err.code ?? ErrorCode.PROTOCOL_ERROR, err.message);
      }
    }
  }

  /** Graceful end of our direction. */
  async close(code = ErrorCode.NO_ERROR, message = "") {
    if (this._sentClose) return;
    this._sentClose = true;
    try {
      await this.send({ type: "Close", code, message });
      await this.stream.fin();
    } catch { /* the stream is gone already */ }
  }

  /** Give up on the stream (both directions). */
  async abort(code, message = "") {
    if (this._sentClose) return;
    this._sentClose = true;
    try {
      await this.send({ type: "Error", code, message: message.slice(0, 1024) });
      await this.stream.fin();
    } catch { /* gone already */ }
  }
}

/** Dialer: the connection handshake on stream 0 (Hello CONTROL with the p2p:connect token). */
export async function dialSession(connection, tokens) {
  const control = new Channel(connection.openStream(), { role: StreamRole.CONTROL });
  await control.send({ type: "Hello", versions: [PROTOCOL_VERSION], role: StreamRole.CONTROL, tokens, resource: "" });
  await expectAccepted(control);
  return new MeshSession(connection, control);
}

async function expectAccepted(channel) {
  const answer = await channel.receive();
  if (answer === null) throw new HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "the peer closed the stream");
  if (answer.type === "HandshakeRefused") throw new HandshakeRefused(answer.code, answer.message);
  if (answer.type !== "HandshakeAccepted" || answer.version !== PROTOCOL_VERSION) {
    throw new ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${answer.type}`);
  }
}

/**
 * Listener: waits for the peer's Hello(CONTROL) on its first stream and asks
 * `validate(hello)` (throw to refuse; a `code` property picks the refusal's code). Then every
 * later stream's Hello goes to `onChannel(hello, channel)` (see serveStreams).
 */
export function acceptSession(connection, { validate, onChannel }) {
  return new Promise((resolve, reject) => {
    let session = null;
    let established = null;
    connection.onClose = (err) => { if (!session) reject(err); };
    connection.onStream = async (stream) => {
      if (session || established) {
        await established;
        return serveStream(connection, stream, onChannel);
      }
      let release;
      established = new Promise((r) => { release = r; });
      const channel = new Channel(stream);
      let hello;
      try {
        hello = await channel.receive();
      } catch (err) {
        return reject(err); // the stream or the connection failed; fail() already said why
      }
      if (!hello || hello.type !== "Hello" || hello.role !== StreamRole.CONTROL) {
        connection.fail(ErrorCode.PROTOCOL_ERROR, "the first stream is not the control stream");
        return reject(new ProtocolError(ErrorCode.PROTOCOL_ERROR, "no control stream first"));
      }
      try {
        if (!hello.versions.includes(PROTOCOL_VERSION)) throw Object.assign(new Error("no common version"), { code: ErrorCode.UNSUPPORTED_VERSION });
        await validate(hello);
      } catch (err) {
        const code = err.code ?? ErrorCode.BAD_TOKEN;
        await channel.send({ type: "HandshakeRefused", code, message: err.code ? err.message : "", versions: [PROTOCOL_VERSION] }).catch(() => {});
        connection.close(code, "refused");
        return reject(new HandshakeRefused(code, err.message));
      }
      await channel.send({ type: "HandshakeAccepted", version: PROTOCOL_VERSION });
      session = new MeshSession(connection, channel);
      release();
      resolve(session);
    };
  });
}

/**
 * After the handshake, each stream the peer opens: its Hello goes to `onChannel(hello,
 * channel)`, which returns false (refuse), true, or a function to run once the stream is
 * accepted. (Both sides of a connection may open streams: an agent reuses the connection the
 * page dialed to send to it.)
 */
export async function serveStream(connection, stream, onChannel) {
  const channel = new Channel(stream);
  let hello;
  try {
    hello = await channel.receive();
  } catch { return; }
  if (!hello) return;
  if (hello.type !== "Hello") return connection.fail(ErrorCode.UNEXPECTED_MESSAGE, `${hello.type} before Hello`);
  if (hello.role === StreamRole.CONTROL) return connection.fail(ErrorCode.DUPLICATE_CONTROL_STREAM, "a second control stream");
  channel.role = hello.role;
  channel.resource = hello.resource;
  let accepted = false;
  try {
    accepted = hello.versions.includes(PROTOCOL_VERSION) && (await onChannel(hello, channel));
  } catch { accepted = false; }
  if (!accepted) {
    await channel.send({ type: "HandshakeRefused", code: ErrorCode.REFUSED, message: "", versions: [PROTOCOL_VERSION] }).catch(() => {});
    await channel.stream.fin();
    return;
  }
  await channel.send({ type: "HandshakeAccepted", version: PROTOCOL_VERSION });
  channel.accepted = true;
  if (typeof accepted === "function") accepted();
}

export class MeshSession {
  constructor(connection, control) {
    this.connection = connection;
    this.control = control;
  }

  /** A new stream of `role`, its Hello sent and answered. */
  async open(role, { tokens = [], resource = "" } = {}) {
    const channel = new Channel(this.connection.openStream(), { role, resource });
    await channel.send({ type: "Hello", versions: [PROTOCOL_VERSION], role, tokens, resource });
    await expectAccepted(channel);
    return channel;
  }

  close(code = ErrorCode.NO_ERROR, reason = "") {
    this.connection.close(code, reason);
  }
}
