// The session protocol's wire format (docs/protocol.md "Frames", "Message registry"): the
// 8-byte frame header, a decoder that takes a stream's bytes split anywhere, and the codecs of
// the session, transfer and terminal messages the web client speaks. A port of
// core/protocol/framing.py and registry.py; tests/browser/js/ checks it against vectors the
// Python side writes.
//
// Messages are plain objects `{type: "Hello", ...fields}`. Control messages are MessagePack
// maps of their fields in declaration order (what msgspec writes); struct messages are a fixed
// big-endian layout, bool fields as flag bits, then raw data (a zero-copy Uint8Array view).
import { Encoder, Decoder } from "../vendor/msgpack.mjs";

export const FRAME_VERSION = 1;
export const HEADER_SIZE = 8;
export const FLAG_IGNORABLE = 0x80;
export const KiB = 1024;
export const MiB = 1024 * KiB;
export const MAX_CONTROL_PAYLOAD = 64 * KiB;
export const MAX_BULK_PAYLOAD = 4 * MiB + 4 * KiB;
export const PROTOCOL_VERSION = 1;

/** `n` random bytes as lowercase hex: transfer ids, signalling attempts, download ids. */
export const randomHex = (n) => Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => b.toString(16).padStart(2, "0")).join("");

export const ErrorCode = Object.freeze({
  NO_ERROR: 0x00, PROTOCOL_ERROR: 0x01, INTERNAL_ERROR: 0x02, CANCELLED: 0x03, GOING_AWAY: 0x04,
  UNSUPPORTED_FRAME_VERSION: 0x10, UNKNOWN_MESSAGE_TYPE: 0x11, FRAME_TOO_LARGE: 0x12,
  BAD_FLAGS: 0x13, BAD_MESSAGE: 0x14, TRUNCATED: 0x15, UNEXPECTED_MESSAGE: 0x16,
  BUFFER_LIMIT_EXCEEDED: 0x17, UNSUPPORTED_VERSION: 0x20, BAD_TOKEN: 0x21, NOT_ALLOWED: 0x22,
  HANDSHAKE_TIMEOUT: 0x23, UNKNOWN_ROLE: 0x24, TOO_MANY_STREAMS: 0x25,
  DUPLICATE_CONTROL_STREAM: 0x26, REFUSED: 0x27,
});

export const StreamRole = Object.freeze({ CONTROL: 0, TRANSFER: 1, TERMINAL: 2, SYNC: 3 });

/** A violation by the peer: `code` goes into the stream's Error or the connection's close. */
export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }
}

function bad(message) {
  throw new ProtocolError(ErrorCode.BAD_MESSAGE, message);
}

// ------------------------------------------------------------------ field checks (decode)

const isInt = (v) => (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
/** A u64 wire integer as a Number (a byte count beyond 2^53 is not a real file here). */
export function num(v) {
  if (typeof v === "bigint") {
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) bad("integer out of range");
    return Number(v);
  }
  return v;
}
const F = {
  int: (lo, hi) => (v, name) => {
    if (!isInt(v)) bad(`${name}: not an integer`);
    const n = typeof v === "bigint" ? v : BigInt(v);
    if ((lo !== null && n < BigInt(lo)) || (hi !== null && n > BigInt(hi))) bad(`${name}: out of range`);
    return typeof v === "bigint" && n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  },
  str: (min, max) => (v, name) => {
    if (typeof v !== "string") bad(`${name}: not a string`);
    // msgspec counts code points; a JS length counts UTF-16 units (2 for an emoji).
    if (v.length < min || (v.length > max && [...v].length > max)) bad(`${name}: length out of range`);
    return v;
  },
  bytes: (min, max) => (v, name) => {
    if (!(v instanceof Uint8Array)) bad(`${name}: not bytes`);
    if (v.length < min || v.length > max) bad(`${name}: length out of range`);
    return v;
  },
  bool: () => (v, name) => {
    if (typeof v !== "boolean") bad(`${name}: not a bool`);
    return v;
  },
  optional: (inner) => (v, name) => (v === null ? null : inner(v, name)),
  array: (inner, min, max) => (v, name) => {
    if (!Array.isArray(v)) bad(`${name}: not an array`);
    if (v.length < min || v.length > max) bad(`${name}: length out of range`);
    return v.map((x, i) => inner(x, `${name}[${i}]`));
  },
  struct: (fields) => (v, name) => checkMap(fields, v, name),
  literal: (...choices) => (v, name) => {
    if (!choices.includes(v)) bad(`${name}: not one of ${choices.join(", ")}`);
    return v;
  },
};

// fields: [[name, check, default (undefined: required)], ...] in declaration order.
function checkMap(fields, value, name) {
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
    bad(`${name}: not a map`);
  }
  const out = {};
  for (const [field, check, fallback] of fields) {
    if (Object.prototype.hasOwnProperty.call(value, field)) {
      out[field] = check(value[field], `${name}.${field}`);
    } else if (fallback === undefined) {
      bad(`${name}: missing ${field}`);
    } else {
      out[field] = fallback;
    }
  }
  return out; // unknown fields are ignored (protocol.md "Versioning")
}

const U16 = F.int(0, 0xffff);
const U32 = F.int(0, 0xffffffff);
const I64 = F.int("-9223372036854775808", "9223372036854775807");
// 1 PiB: TransferLimits' max_file_size and max_total_bytes (the wire allows int64; a page adds
// sizes as Numbers, exact only below 2^53, so it refuses more at decoding).
const BYTE_COUNT = F.int(0, 2 ** 50);
const CODE = F.int(0, 0xffffffff);
const REASON = F.str(0, 1024);

// ------------------------------------------------------------------ codecs

const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: false });
const decoder = new Decoder({ useBigInt64: true });

function control(code, type, fields, maxPayload = MAX_CONTROL_PAYLOAD) {
  return {
    code, type, maxPayload, flagsMask: 0,
    encode(message) {
      const map = {};
      for (const [field, check, fallback] of fields) {
        const value = message[field] !== undefined ? message[field] : fallback;
        if (value === undefined) throw new TypeError(`${type}: missing ${field}`);
        map[field] = value;
      }
      checkMap(fields, map, type); // a bad field fails here, not at the peer
      return [0, encoder.encode(map), null];
    },
    decode(flags, payload) {
      let value;
      try {
        value = decoder.decode(payload);
      } catch (err) {
        bad(`${type}: ${err.message}`);
      }
      return { type, ...checkMap(fields, value, type) };
    },
  };
}

// layout: [[name, "u16" | "u32" | "u64" | "bytes32"], ...]; flags: {field: bit}; data: field name.
const SIZES = { u16: 2, u32: 4, u64: 8, bytes32: 32 };
function struct(code, type, layout, { data = null, flags = {}, maxPayload = null, bulk = true } = {}) {
  const head = layout.reduce((n, [, kind]) => n + SIZES[kind], 0);
  return {
    code, type, head,
    maxPayload: maxPayload ?? (data && bulk ? MAX_BULK_PAYLOAD : MAX_CONTROL_PAYLOAD),
    flagsMask: Object.values(flags).reduce((a, b) => a | b, 0),
    encode(message) {
      const bytes = new Uint8Array(head);
      const view = new DataView(bytes.buffer);
      let at = 0;
      for (const [field, kind] of layout) {
        const v = message[field];
        if (kind === "u16") view.setUint16(at, v);
        else if (kind === "u32") view.setUint32(at, v);
        else if (kind === "u64") view.setBigUint64(at, BigInt(v));
        else {
          if (!(v instanceof Uint8Array) || v.length !== 32) throw new TypeError(`${type}.${field}: 32 bytes`);
          bytes.set(v, at);
        }
        at += SIZES[kind];
      }
      let bits = 0;
      for (const [field, bit] of Object.entries(flags)) if (message[field]) bits |= bit;
      return [bits, bytes, data ? message[data] : null];
    },
    decode(bits, payload) {
      if (data ? payload.length < head : payload.length !== head) bad(`${type}: payload of ${payload.length} bytes`);
      const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
      const out = { type };
      let at = 0;
      for (const [field, kind] of layout) {
        if (kind === "u16") out[field] = view.getUint16(at);
        else if (kind === "u32") out[field] = view.getUint32(at);
        else if (kind === "u64") out[field] = num(view.getBigUint64(at));
        else out[field] = payload.slice(at, at + 32);
        at += SIZES[kind];
      }
      for (const [field, bit] of Object.entries(flags)) out[field] = Boolean(bits & bit);
      if (data) out[data] = payload.subarray(head);
      return out;
    },
  };
}

// ------------------------------------------------------------------ the messages

const TOKEN = F.str(1, 4096);
const VERSIONS = F.array(U16, 1, 16);
const ENTRY = [
  ["path", F.str(1, 4096)],
  ["kind", F.literal("file", "dir")],
  ["size", BYTE_COUNT],
  ["mode", F.int(0, 0o7777)],
  ["mtime_ns", I64],
  ["key", F.bytes(16, 16)],
];
const HAVE = [["index", U32], ["chunks", F.bytes(0, 2 ** 29)]];

export const MESSAGES = [
  // session (messages.py)
  control(0x0001, "Hello", [
    ["versions", VERSIONS], ["role", F.int(0, 0xffffffff)],
    ["tokens", F.array(TOKEN, 0, 8), []], ["resource", F.str(0, 256), ""],
  ], 48 * KiB),
  control(0x0002, "HandshakeAccepted", [["version", U16]]),
  control(0x0003, "HandshakeRefused", [["code", CODE], ["message", REASON, ""], ["versions", F.array(U16, 0, 16), []]]),
  control(0x0004, "Close", [["code", CODE, 0], ["message", REASON, ""]]),
  control(0x0005, "Error", [["code", CODE], ["message", REASON, ""]]),
  // transfer (transfer.py)
  control(0x0100, "Offer", [
    ["transfer_id", F.str(1, 256)], ["entries", F.array(F.struct(ENTRY), 0, 1_000_000)],
    ["total_bytes", BYTE_COUNT], ["chunk_size", F.int(1, 4 * MiB)],
  ], 16 * MiB),
  control(0x0101, "Answer", [["accepted", F.bool()], ["reason", REASON, ""], ["have", F.array(F.struct(HAVE), 0, 1_000_000), []]], 16 * MiB),
  struct(0x0102, "Chunk", [["index", "u32"], ["chunk", "u32"], ["digest", "bytes32"]], { data: "data" }),
  struct(0x0103, "FileEnd", [["index", "u32"], ["digest", "bytes32"]]),
  struct(0x0104, "Resend", [["index", "u32"], ["chunk", "u32"]]),
  struct(0x0105, "Progress", [["bytes_verified", "u64"], ["files_done", "u32"]]),
  control(0x0106, "FileDone", [["index", U32], ["ok", F.bool()], ["reason", REASON, ""]]),
  control(0x0107, "Cancel", [["reason", REASON, ""], ["code", CODE, ErrorCode.CANCELLED]]),
  struct(0x0108, "Complete", [["files", "u32"], ["bytes", "u64"]]),
  // terminal (terminal.py)
  control(0x0201, "Join", [["from_offset", F.optional(F.int(0, "9223372036854775807")), null], ["cols", U16, 0], ["rows", U16, 0]]),
  struct(0x0202, "Output", [["offset", "u64"]], { data: "data", maxPayload: 8 + 256 * KiB }),
  struct(0x0203, "Snapshot", [["offset", "u64"], ["cols", "u16"], ["rows", "u16"]], { data: "data", flags: { final: 0x01 }, maxPayload: 12 + MiB }),
  struct(0x0204, "Input", [], { data: "data", bulk: false, maxPayload: 16 * KiB }),
  struct(0x0205, "Resize", [["cols", "u16"], ["rows", "u16"]]),
  control(0x0206, "ControlState", [["controller", F.optional(F.str(1, 256)), null], ["epoch", F.int(0, null), 0], ["you", F.bool(), false]]),
  control(0x0207, "ControlRequest", [["token", F.str(0, 4096), ""]]),
  control(0x0208, "ControlRelease", []),
  control(0x0209, "ControlDenied", [["reason", REASON, ""]]),
  control(0x020a, "Ended", [["exit_code", F.optional(F.int("-9223372036854775808", "9223372036854775807")), null], ["signal", F.optional(F.int(1, 255)), null], ["message", REASON, ""]]),
];

const BY_CODE = new Map(MESSAGES.map((spec) => [spec.code, spec]));
const BY_TYPE = new Map(MESSAGES.map((spec) => [spec.type, spec]));
export const codeOf = (type) => BY_TYPE.get(type).code;

/** A message as its frame's parts `[header + metadata, data]` (data may be null): a 1 MiB
 * chunk is never copied into a frame. */
export function encodeParts(message) {
  const spec = BY_TYPE.get(message.type);
  if (!spec) throw new TypeError(`unknown message ${message.type}`);
  const [flags, head, data] = spec.encode(message);
  const length = head.length + (data ? data.length : 0);
  if (length > spec.maxPayload) throw new RangeError(`${message.type}: ${length} bytes over its cap`);
  const first = new Uint8Array(HEADER_SIZE + head.length);
  const view = new DataView(first.buffer);
  view.setUint8(0, FRAME_VERSION);
  view.setUint8(1, flags);
  view.setUint16(2, spec.code);
  view.setUint32(4, length);
  first.set(head, HEADER_SIZE);
  return [first, data && data.length ? data : null];
}

/** The whole frame in one buffer (tests, small messages). */
export function encode(message) {
  const [head, data] = encodeParts(message);
  if (!data) return head;
  const out = new Uint8Array(head.length + data.length);
  out.set(head);
  out.set(data, head.length);
  return out;
}

/**
 * Bytes in (split anywhere) -> messages out, one at a time. The header is checked (version,
 * type, flags, length against the type's cap, `allowed` types) before a payload byte is kept,
 * and a frame's buffer grows only with bytes that arrived. After a ProtocolError the decoder
 * is broken: it throws the same error on every call.
 */
export class FrameDecoder {
  constructor({ allowed = null } = {}) {
    this.allowed = allowed; // a Set of type codes, or null for every known type
    this._chunks = [];
    this._offset = 0; // into _chunks[0]
    this._buffered = 0;
    this._header = null;
    this._skip = 0;
    this._error = null;
  }

  get bufferedBytes() {
    return this._buffered;
  }

  feed(bytes) {
    if (this._error) throw this._error;
    if (bytes.length) {
      this._chunks.push(bytes);
      this._buffered += bytes.length;
    }
  }

  /** The next message, or null when more bytes are needed. */
  next() {
    if (this._error) throw this._error;
    try {
      return this._next();
    } catch (err) {
      this._error = err instanceof ProtocolError ? err : new ProtocolError(ErrorCode.BAD_MESSAGE, String(err));
      this._chunks = [];
      this._buffered = 0;
      throw this._error;
    }
  }

  /** Every complete message in `bytes` and what came before. */
  receive(bytes) {
    this.feed(bytes);
    const out = [];
    for (let m = this.next(); m !== null; m = this.next()) out.push(m);
    return out;
  }

  _take(n) {
    // n bytes from the queue: a view of one chunk when they lie inside it, else one copy.
    const first = this._chunks[0];
    let out;
    if (first.length - this._offset >= n) {
      out = first.subarray(this._offset, this._offset + n);
      this._offset += n;
    } else {
      out = new Uint8Array(n);
      let filled = 0;
      while (filled < n) {
        const chunk = this._chunks[0];
        const piece = Math.min(n - filled, chunk.length - this._offset);
        out.set(chunk.subarray(this._offset, this._offset + piece), filled);
        filled += piece;
        this._offset += piece;
        if (this._offset === chunk.length) {
          this._chunks.shift();
          this._offset = 0;
        }
      }
    }
    if (this._chunks.length && this._offset === this._chunks[0].length) {
      this._chunks.shift();
      this._offset = 0;
    }
    this._buffered -= n;
    return out;
  }

  _next() {
    for (;;) {
      if (this._skip) {
        const n = Math.min(this._skip, this._buffered);
        if (n) this._take(n);
        this._skip -= n;
        if (this._skip) return null;
      }
      if (!this._header) {
        if (this._buffered < HEADER_SIZE) return null;
        const head = this._take(HEADER_SIZE);
        const view = new DataView(head.buffer, head.byteOffset, HEADER_SIZE);
        const version = view.getUint8(0);
        const flags = view.getUint8(1);
        const code = view.getUint16(2);
        const length = view.getUint32(4);
        if (version !== FRAME_VERSION) throw new ProtocolError(ErrorCode.UNSUPPORTED_FRAME_VERSION, `frame version ${version}`);
        const spec = BY_CODE.get(code);
        if (!spec || code === 0) {
          if (flags & FLAG_IGNORABLE && code !== 0) {
            if (length > MAX_CONTROL_PAYLOAD) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `ignorable frame of ${length} bytes`);
            this._skip = length;
            continue;
          }
          throw new ProtocolError(ErrorCode.UNKNOWN_MESSAGE_TYPE, `unknown message type ${code}`);
        }
        // In framing.py's order, so a frame breaking two rules gets the same code from both.
        if (this.allowed && !this.allowed.has(code)) throw new ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${spec.type}`);
        if ((flags & 0x7f) & ~spec.flagsMask) throw new ProtocolError(ErrorCode.BAD_FLAGS, `flags ${flags} on ${spec.type}`);
        if (length > spec.maxPayload) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `${spec.type} of ${length} bytes`);
        this._header = { spec, flags: flags & 0x7f, length };
      }
      const { spec, flags, length } = this._header;
      if (this._buffered < length) return null;
      const payload = length ? this._take(length) : new Uint8Array(0);
      this._header = null;
      const message = spec.decode(flags, payload);
      message.frameBytes = HEADER_SIZE + length; // what the stream's credit counts
      return message;
    }
  }
}
