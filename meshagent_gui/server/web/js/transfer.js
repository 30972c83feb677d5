// File transfers (docs/protocol.md "Transfers"): the browser's receiver (an agent sends to the
// page) and sender (the page sends to an agent), over one TRANSFER stream. Ported from
// core/protocol/transfer.py with what a browser needs: every sender message is checked against
// the offer before anything is written, chunk digests and whole-file digests are blake3, and
// the data goes to a sink (a file on disk) as it arrives: nothing holds a whole file.
//
// The browser's sinks are sequential (a download stream), so a chunk must arrive in order; the
// agent sends them in order and a reliable DataChannel keeps it. A chunk that fails its digest
// therefore cancels the transfer instead of asking for a Resend.
import { createBLAKE3 } from "../vendor/blake3.mjs";
import { ErrorCode, ProtocolError } from "./wire.js";

export const TransferErrorCode = Object.freeze({
  CANCELLED: 0x03, BAD_OFFER: 0x100, TOO_MANY_ENTRIES: 0x101, TOO_LARGE: 0x102, BAD_PATH: 0x103,
  BAD_CHUNK_SIZE: 0x104, NO_SUCH_ENTRY: 0x110, NOT_A_FILE: 0x111, CHUNK_OUT_OF_RANGE: 0x112,
  BAD_CHUNK_LENGTH: 0x113, EARLY_FILE_END: 0x114, DUPLICATE_FILE_END: 0x115, EXCESS_DATA: 0x116,
  BAD_ANSWER: 0x120, BAD_RESEND: 0x121, BAD_REPORT: 0x122, TOO_MANY_RESENDS: 0x130,
  DISK_FULL: 0x131, SOURCE_CHANGED: 0x132, SOURCE_UNREADABLE: 0x133, OFFER_TIMEOUT: 0x134,
});
export const CHUNK_SIZE = 1024 * 1024;
export const MIN_CHUNK_SIZE = 16 * 1024;
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024;
const PROGRESS_INTERVAL_MS = 100;
export const MAX_RESENDS = 3; // of one chunk (transfer.py DEFAULT_MAX_RESENDS)

export class TransferError extends Error {
  constructor(message, code = ErrorCode.CANCELLED) {
    super(message);
    this.name = "TransferError";
    this.code = code;
  }
}

const violation = (code, message) => new ProtocolError(code, message);
export const chunkCount = (size, chunkSize) => Math.ceil(size / chunkSize);

export function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Syntax of an offered path (transfer.py): relative, '/'-separated, no empty part, no NUL. */
export function checkPath(path) {
  if (!path || path.includes("\0") || new TextEncoder().encode(path).length > 4096) return false;
  return path.split("/").every((part) => part.length > 0);
}

/** Checks an Offer the way TransferReceiver does; throws a ProtocolError naming the rule. */
export function checkOffer(offer, transferId) {
  const T = TransferErrorCode;
  if (transferId && offer.transfer_id !== transferId) throw violation(T.BAD_OFFER, "an offer for another transfer");
  if (offer.chunk_size < MIN_CHUNK_SIZE || offer.chunk_size > MAX_CHUNK_SIZE) throw violation(T.BAD_CHUNK_SIZE, "chunk size out of range");
  const seen = new Set();
  let total = 0;
  for (const entry of offer.entries) {
    if (!checkPath(entry.path)) throw violation(T.BAD_PATH, "a bad path");
    if (seen.has(entry.path)) throw violation(T.BAD_OFFER, "a path twice");
    seen.add(entry.path);
    if (entry.kind === "dir" && entry.size !== 0) throw violation(T.BAD_OFFER, "a folder with a size");
    if (chunkCount(entry.size, offer.chunk_size) > 0xffffffff) throw violation(T.TOO_LARGE, "too many chunks");
    total += entry.size;
  }
  if (total !== offer.total_bytes) throw violation(T.BAD_OFFER, "the total is not the sum of the sizes");
}

/**
 * The page receives an offered transfer. `openSink(entry, index)` returns the place a file's
 * bytes go: `{write(bytes), close(), abort(reason)}` (async). `onProgress({bytes, total,
 * filesDone})` is called as data is verified.
 */
export class IncomingTransfer {
  constructor(channel, offer, { onProgress = () => {}, now = () => performance.now() } = {}) {
    checkOffer(offer, channel.resource);
    this.channel = channel;
    this.offer = offer;
    this.onProgress = onProgress;
    this.now = now;
    this.files = offer.entries.map((entry, index) => ({ entry, index })).filter((f) => f.entry.kind === "file");
    this.bytesVerified = 0;
    this.filesDone = 0;
    this.state = "deciding";
    this._lastProgress = -Infinity;
    this._cancelled = false;
  }

  get total() {
    return this.offer.total_bytes;
  }

  async decline(reason = "declined") {
    this.state = "declined";
    await this.channel.send({ type: "Answer", accepted: false, reason, have: [] });
    await this.channel.close();
  }

  /** Accepts and receives everything; resolves with {files, bytes} once Complete went out. */
  async accept(openSink) {
    const T = TransferErrorCode;
    const chunkSize = this.offer.chunk_size;
    const chunkHasher = await createBLAKE3();
    this.state = "receiving";
    await this.channel.send({ type: "Answer", accepted: true, reason: "", have: [] });
    const incoming = new Map(); // index -> {entry, index, sink, hasher, next, chunks, ended, done}
    for (const { entry, index } of this.files) {
      incoming.set(index, { entry, index, sink: null, hasher: null, next: 0, chunks: chunkCount(entry.size, chunkSize), ended: false, done: false });
    }
    const openFile = async (file) => {
      // The sink opens with the file's first chunk (or its FileEnd, for an empty file).
      if (file.sink) return;
      file.sink = await openSink(file.entry, file.index);
      file.hasher = await createBLAKE3();
      file.hasher.init();
    };
    let doneFiles = 0;
    let doneBytes = 0;
    const finish = async (file, ok, reason) => {
      file.done = true;
      if (ok) {
        await file.sink.close();
        doneFiles += 1;
        doneBytes += file.entry.size;
      } else if (file.sink) await file.sink.abort(reason);
      this.filesDone += 1;
      await this.channel.send({ type: "FileDone", index: file.index, ok, reason });
    };
    try {
      if (!this.files.length) {
        await this.channel.send({ type: "Complete", files: 0, bytes: 0 });
      }
      for (;;) {
        if (this._cancelled) throw new TransferError("cancelled", T.CANCELLED);
        const message = await this.channel.receive();
        if (message === null) {
          if (this.state === "done") return { files: doneFiles, bytes: doneBytes };
          throw new TransferError("the sender ended the transfer early", ErrorCode.TRUNCATED);
        }
        if (message.type === "Cancel") {
          this.state = "cancelled";
          for (const file of incoming.values()) if (file.sink && !file.done) await file.sink.abort("cancelled by the sender");
          throw new TransferError(`the sender cancelled${message.reason ? `: ${message.reason}` : ""}`, message.code);
        }
        if (this.state === "done") throw violation(ErrorCode.UNEXPECTED_MESSAGE, `${message.type} after Complete`);
        if (message.type === "Chunk" || message.type === "FileEnd") {
          const entry = this.offer.entries[message.index];
          if (!entry) throw violation(T.NO_SUCH_ENTRY, "no such entry");
          if (entry.kind !== "file") throw violation(T.NOT_A_FILE, "not a file");
          const file = incoming.get(message.index);
          if (message.type === "Chunk") {
            if (file.ended) throw violation(T.EXCESS_DATA, "a chunk after its file's end");
            if (message.chunk >= file.chunks) throw violation(T.CHUNK_OUT_OF_RANGE, "chunk out of range");
            const expected = message.chunk === file.chunks - 1 ? entry.size - message.chunk * chunkSize : chunkSize;
            if (message.data.length !== expected) throw violation(T.BAD_CHUNK_LENGTH, "bad chunk length");
            if (message.chunk < file.next) continue; // a duplicate: ignored, never written twice
            if (message.chunk !== file.next) throw violation(ErrorCode.UNEXPECTED_MESSAGE, "a chunk out of order");
            chunkHasher.init();
            chunkHasher.update(message.data);
            if (!sameBytes(chunkHasher.digest("binary"), message.digest)) {
              throw new TransferError("a chunk arrived damaged (its digest does not match)", ErrorCode.INTERNAL_ERROR);
            }
            await openFile(file);
            await file.sink.write(message.data);
            file.hasher.update(message.data);
            file.next += 1;
            this.bytesVerified += message.data.length;
          } else {
            if (file.ended) throw violation(T.DUPLICATE_FILE_END, "a second FileEnd");
            if (file.next !== file.chunks) throw violation(T.EARLY_FILE_END, "FileEnd before every chunk");
            file.ended = true;
            await openFile(file);
            const ok = sameBytes(file.hasher.digest("binary"), message.digest);
            await finish(file, ok, ok ? "" : "the file's digest does not match");
            if (this.filesDone === incoming.size) {
              await this.channel.send({ type: "Complete", files: doneFiles, bytes: doneBytes });
              this.state = "done";
            }
          }
          await this._progress(this.state === "done");
          continue;
        }
        throw violation(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${message.type}`);
      }
    } catch (err) {
      for (const file of incoming.values()) if (file.sink && !file.done) await file.sink.abort(err.message).catch(() => {});
      if (err instanceof ProtocolError) await this.channel.abort(err.code, err.message);
      else if (err instanceof TransferError && this.state !== "cancelled") {
        await this.channel.send({ type: "Cancel", reason: err.message.slice(0, 1024), code: err.code }).catch(() => {});
        await this.channel.close().catch(() => {});
      }
      this.state = this.state === "cancelled" ? "cancelled" : "failed";
      throw err;
    } finally {
      if (this.state === "done") await this.channel.close();
    }
  }

  async _progress(force) {
    const now = this.now();
    if (!force && now - this._lastProgress < PROGRESS_INTERVAL_MS) return;
    this._lastProgress = now;
    this.onProgress({ bytes: this.bytesVerified, total: this.total, filesDone: this.filesDone });
    if (!force) await this.channel.send({ type: "Progress", bytes_verified: this.bytesVerified, files_done: this.filesDone });
  }

  /** The user cancels: the next step sends Cancel. */
  cancel() {
    this._cancelled = true;
    this.channel.send({ type: "Cancel", reason: "cancelled in the browser", code: TransferErrorCode.CANCELLED })
      .then(() => this.channel.close()).catch(() => {});
    this.state = "cancelled";
  }
}

// ------------------------------------------------------------------ sending

/** Entries for `items` ([{file: File, path}]): folders first (so empty ones survive). */
export async function buildEntries(items) {
  const keyer = await createBLAKE3();
  const dirs = new Set();
  for (const { path } of items) {
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join("/"));
  }
  const entries = [...dirs].sort().map((path) => ({ path, kind: "dir", size: 0, mode: 0o755, mtime_ns: 0, key: new Uint8Array(16) }));
  for (const { file, path } of items) {
    // The key names this version of the file: the same file picked again after a reload has
    // the same key, so the agent resumes from its partial copy.
    keyer.init();
    keyer.update(`${path}\0${file.size}\0${file.lastModified}`);
    entries.push({
      path, kind: "file", size: file.size, mode: 0o644,
      mtime_ns: BigInt(file.lastModified) * 1000000n, key: keyer.digest("binary").slice(0, 16),
    });
  }
  return entries;
}

function heldChunks(answer, entries, chunkSize) {
  const held = new Map();
  for (const have of answer.have) {
    const entry = entries[have.index];
    if (!entry || entry.kind !== "file" || held.has(have.index)) throw violation(TransferErrorCode.BAD_ANSWER, "a bad Have");
    const chunks = chunkCount(entry.size, chunkSize);
    if (have.chunks.length !== Math.ceil(chunks / 8)) throw violation(TransferErrorCode.BAD_ANSWER, "a bitmap of the wrong length");
    const set = new Set();
    for (let c = 0; c < have.chunks.length * 8; c++) {
      if (have.chunks[c >> 3] & (1 << (c & 7))) {
        if (c >= chunks) throw violation(TransferErrorCode.BAD_ANSWER, "a bit beyond the file");
        set.add(c);
      }
    }
    held.set(have.index, set);
  }
  return held;
}

/**
 * Sends `items` ([{file: File, path}]) on an open TRANSFER channel (the Hello carried the
 * share token; `channel.resource` is the transfer id). Resolves with {files, bytes} once the
 * receiver's Complete came; `onProgress({bytes, total, sent})`; `signal` (AbortSignal) cancels.
 */
export async function sendFiles(channel, items, { onProgress = () => {}, signal = null, chunkSize = CHUNK_SIZE } = {}) {
  const entries = await buildEntries(items);
  const total = items.reduce((n, { file }) => n + file.size, 0);
  const byPath = new Map(items.map((item) => [item.path, item.file]));
  const fileOf = new Map(); // entry index -> File (one lookup each: a folder may hold 10^5 files)
  entries.forEach((entry, index) => {
    if (entry.kind === "file") fileOf.set(index, byPath.get(entry.path));
  });
  await channel.send({ type: "Offer", transfer_id: channel.resource, entries, total_bytes: total, chunk_size: chunkSize });
  const answer = await channel.receive();
  if (answer === null) throw new TransferError("the receiver closed the stream");
  if (answer.type === "Cancel") throw new TransferError(`the receiver cancelled: ${answer.reason}`, answer.code);
  if (answer.type !== "Answer") throw violation(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${answer.type}`);
  if (!answer.accepted) {
    await channel.close();
    throw new TransferError(`the receiver declined: ${answer.reason || "no reason given"}`, ErrorCode.REFUSED);
  }
  const held = heldChunks(answer, entries, chunkSize);
  let resumed = 0; // bytes the receiver already held (a resume): read and hashed, not sent
  for (const [index, chunks] of held) {
    const size = entries[index].size;
    for (const c of chunks) resumed += Math.min(chunkSize, size - c * chunkSize);
  }
  const resends = []; // [index, chunk] asked for again and not yet sent
  const resendCounts = new Map(); // "index/chunk" -> times sent again
  const failed = new Set();
  const confirmed = new Set();
  const sentChunks = new Map();
  let verified = 0;
  let sent = 0;
  let complete = null;
  let peerError = null;
  let wake = null;
  const poke = () => { const w = wake; wake = null; if (w) w(); };

  const reader = (async () => {
    for (;;) {
      let message;
      try {
        message = await channel.receive();
      } catch (err) {
        peerError = err;
        return poke();
      }
      if (message === null) {
        if (!complete) peerError = new TransferError("the receiver closed the stream early", ErrorCode.TRUNCATED);
        return poke();
      }
      switch (message.type) {
        case "Resend":
          if (!sentChunks.get(message.index)?.has(message.chunk) || confirmed.has(message.index) || failed.has(message.index)
              || resends.some(([i, c]) => i === message.index && c === message.chunk)) {
            peerError = violation(TransferErrorCode.BAD_RESEND, "a Resend of a chunk not sent, already reported on, or already asked for");
            return poke();
          }
          resends.push([message.index, message.chunk]);
          break;
        case "Progress":
          if (message.bytes_verified > total || message.files_done > fileOf.size) {
            peerError = violation(TransferErrorCode.BAD_REPORT, "progress beyond the offer");
            return poke();
          }
          verified = message.bytes_verified;
          onProgress({ bytes: verified, total, sent });
          break;
        case "FileDone":
          if (message.ok) confirmed.add(message.index);
          else failed.add(message.index);
          break;
        case "Complete":
          complete = message;
          onProgress({ bytes: message.bytes, total, sent });
          return poke();
        case "Cancel":
          peerError = new TransferError(`the receiver cancelled${message.reason ? `: ${message.reason}` : ""}`, message.code);
          return poke();
        default:
          peerError = violation(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${message.type}`);
          return poke();
      }
      poke();
    }
  })();

  const chunkHasher = await createBLAKE3();
  const fileHasher = await createBLAKE3();
  const readChunk = async (file, c) => new Uint8Array(await file.slice(c * chunkSize, Math.min(file.size, (c + 1) * chunkSize)).arrayBuffer());
  const sendChunk = async (index, c, data) => {
    chunkHasher.init();
    chunkHasher.update(data);
    await channel.send({ type: "Chunk", index, chunk: c, digest: chunkHasher.digest("binary"), data });
    if (!sentChunks.has(index)) sentChunks.set(index, new Set());
    sentChunks.get(index).add(c);
    sent += data.length;
  };
  const checkStop = async () => {
    if (signal?.aborted) {
      await channel.send({ type: "Cancel", reason: "cancelled in the browser", code: TransferErrorCode.CANCELLED }).catch(() => {});
      await channel.close();
      throw new TransferError("cancelled", TransferErrorCode.CANCELLED);
    }
    if (peerError) {
      if (peerError instanceof ProtocolError) await channel.abort(peerError.code, peerError.message);
      throw peerError;
    }
    while (resends.length) {
      const [index, c] = resends.shift();
      const count = (resendCounts.get(`${index}/${c}`) ?? 0) + 1;
      if (count > MAX_RESENDS) {
        throw new TransferError(`${entries[index].path}: chunk ${c} failed its digest ${count} times`, TransferErrorCode.TOO_MANY_RESENDS);
      }
      resendCounts.set(`${index}/${c}`, count);
      await sendChunk(index, c, await readChunk(fileOf.get(index), c));
    }
  };

  try {
    for (const [index, file] of fileOf) {
      const chunks = chunkCount(file.size, chunkSize);
      const have = held.get(index) ?? new Set();
      fileHasher.init();
      for (let c = 0; c < chunks; c++) {
        await checkStop();
        if (failed.has(index)) break;
        const data = await readChunk(file, c);
        if (data.length !== Math.min(chunkSize, file.size - c * chunkSize)) {
          throw new TransferError(`${file.name} changed while it was sent`, TransferErrorCode.SOURCE_CHANGED);
        }
        fileHasher.update(data);
        if (have.has(c)) sent += data.length;
        else await sendChunk(index, c, data);
        onProgress({ bytes: verified, total, sent });
      }
      if (!failed.has(index)) await channel.send({ type: "FileEnd", index, digest: fileHasher.digest("binary") });
    }
    while (!complete) {
      await checkStop();
      if (!complete && !peerError && !resends.length && !signal?.aborted) {
        await new Promise((resolve) => {
          wake = resolve;
          signal?.addEventListener("abort", poke, { once: true });
        });
      }
    }
    await channel.close();
    await reader;
    return { files: complete.files, bytes: complete.bytes, failed: [...failed], resumed };
  } catch (err) {
    if (err instanceof TransferError && err.code !== TransferErrorCode.CANCELLED && !peerError) {
      await channel.send({ type: "Cancel", reason: err.message.slice(0, 1024), code: err.code }).catch(() => {});
      await channel.close().catch(() => {});
    }
    throw err;
  }
}

