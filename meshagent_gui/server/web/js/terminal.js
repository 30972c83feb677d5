// Watching a shared terminal (docs/protocol.md "Terminal share"): the viewer's side of one
// TERMINAL stream. Join, then the host's Snapshot parts, Output at byte offsets without gaps,
// Resize, ControlState / ControlDenied and Ended. Input goes out only while the host says this
// viewer controls the terminal (the host drops it otherwise anyway).
import { ProtocolError, ErrorCode } from "./wire.js";

const MAX_INPUT = 16 * 1024;
const MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024;

/**
 * `screen` is what shows the bytes: `{write(Uint8Array), reset(), resize(cols, rows)}` (an
 * xterm.js Terminal adapted in app.js; a recorder in tests). `onState(state)` hears
 * `{controller, you, epoch}`, `onDenied(reason)`, `onEnded(ended)`.
 */
export class TerminalViewer {
  constructor(channel, screen, { onState = () => {}, onDenied = () => {}, onEnded = () => {} } = {}) {
    this.channel = channel;
    this.screen = screen;
    this.onState = onState;
    this.onDenied = onDenied;
    this.onEnded = onEnded;
    this.offset = null; // the stream offset of the next live byte
    this.you = false;
    this.epoch = -1;
    this.ended = null;
    this._snapshot = null; // parts of a snapshot being gathered
  }

  /** Joins (fresh, or resuming at the last offset seen) and shows the stream until it ends. */
  async run({ cols = 0, rows = 0 } = {}) {
    await this.channel.send({ type: "Join", from_offset: this.offset, cols, rows });
    for (;;) {
      const message = await this.channel.receive();
      if (message === null) return this.ended;
      this.handle(message);
      if (this.ended) {
        await this.channel.close();
        return this.ended;
      }
    }
  }

  /** One host message (public so the protocol tests can drive it without a stream). */
  handle(message) {
    switch (message.type) {
      case "Snapshot": {
        if (this._snapshot && (this._snapshot.offset !== message.offset || this._snapshot.cols !== message.cols || this._snapshot.rows !== message.rows)) {
          throw new ProtocolError(ErrorCode.BAD_MESSAGE, "snapshot parts disagree");
        }
        const parts = this._snapshot ?? { offset: message.offset, cols: message.cols, rows: message.rows, data: [], size: 0 };
        parts.data.push(message.data.slice());
        parts.size += message.data.length;
        if (parts.size > MAX_SNAPSHOT_BYTES) throw new ProtocolError(ErrorCode.BAD_MESSAGE, "snapshot too large");
        this._snapshot = parts;
        if (message.final) {
          this._snapshot = null;
          this.screen.reset();
          this.screen.resize(parts.cols, parts.rows);
          for (const piece of parts.data) this.screen.write(piece);
          this.offset = parts.offset;
        }
        return;
      }
      case "Output": {
        if (this.offset === null) throw new ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "output before the snapshot");
        if (message.offset > this.offset) throw new ProtocolError(ErrorCode.BAD_MESSAGE, "a gap in the output");
        const skip = this.offset - message.offset; // a resume may overlap what we have
        if (skip < message.data.length) {
          this.screen.write(message.data.subarray(skip));
          this.offset = message.offset + message.data.length;
        }
        return;
      }
      case "Resize":
        this.screen.resize(message.cols, message.rows);
        return;
      case "ControlState":
        if (message.epoch < this.epoch) return; // a stale state
        this.epoch = message.epoch;
        this.you = message.you;
        this.onState({ controller: message.controller, you: message.you, epoch: message.epoch });
        return;
      case "ControlDenied":
        this.onDenied(message.reason);
        return;
      case "Ended":
        this.ended = message;
        this.you = false;
        this.onEnded(message);
        return;
      default:
        throw new ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, `unexpected ${message.type}`);
    }
  }

  /** Asks the host for control with a fresh terminal:control token from the server. */
  async requestControl(token) {
    await this.channel.send({ type: "ControlRequest", token });
  }

  async releaseControl() {
    await this.channel.send({ type: "ControlRelease" });
  }

  /** Keystrokes: sent only while this viewer controls the terminal. */
  async input(text) {
    if (!this.you || this.ended) return false;
    const bytes = typeof text === "string" ? new TextEncoder().encode(text) : text;
    for (let at = 0; at < bytes.length; at += MAX_INPUT) {
      await this.channel.send({ type: "Input", data: bytes.subarray(at, at + MAX_INPUT) });
    }
    return true;
  }

  async resize(cols, rows) {
    if (this.you) await this.channel.send({ type: "Resize", cols, rows });
  }
}

/**
 * Drops what a shared program sends to make the viewer's terminal answer or touch the
 * clipboard (core/terminal/sanitize.py): device and cursor reports (DA, DSR, DECRQSS, window
 * and colour queries) and OSC 52. xterm.js would answer those through its input.
 */
export function filterQueries(text) {
  return text
    .replace(/\x1b\[[>=?]?[0-9;]*c/g, "") // DA1/DA2/DA3
    .replace(/\x1b\[[?]?[0-9;]*n/g, "") // DSR
    .replace(/\x1bP\$q[\s\S]*?\x1b\\/g, "") // DECRQSS
    .replace(/\x1b\[[0-9;]*t/g, "") // window ops and reports
    .replace(/\x1b\](?:4|10|11|12|52);[^\x07\x1b]*(?:\x07|\x1b\\)/g, ""); // colour queries, clipboard
}
