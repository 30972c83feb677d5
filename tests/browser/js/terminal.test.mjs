// The terminal viewer: snapshot parts, live output by offset, control state, input only in control.
import { test } from "node:test";
import assert from "node:assert/strict";
import { webModule, FakeChannel } from "./helpers.mjs";

const { TerminalViewer, filterQueries } = await webModule("js/terminal.js");
const wire = await webModule("js/wire.js");
const enc = (s) => new TextEncoder().encode(s);

function recorder() {
  const screen = { text: "", size: null, resets: 0 };
  screen.write = (b) => { screen.text += new TextDecoder().decode(b); };
  screen.reset = () => { screen.text = ""; screen.resets += 1; };
  screen.resize = (c, r) => { screen.size = [c, r]; };
  return screen;
}

test("joins, shows the snapshot then output without repeats, and follows control", async () => {
  const channel = new FakeChannel("s1");
  const screen = recorder();
  const states = [];
  const denied = [];
  const viewer = new TerminalViewer(channel, screen, { onState: (s) => states.push(s), onDenied: (r) => denied.push(r) });
  channel.push({ type: "Snapshot", offset: 10, cols: 80, rows: 24, final: false, data: enc("hel") });
  channel.push({ type: "Snapshot", offset: 10, cols: 80, rows: 24, final: true, data: enc("lo$ ") });
  channel.push({ type: "ControlState", controller: null, epoch: 0, you: false });
  channel.push({ type: "Output", offset: 10, data: enc("ls\r\n") });
  channel.push({ type: "Output", offset: 12, data: enc("\r\nfile\r\n") }); // overlaps 2 bytes
  channel.push({ type: "ControlDenied", reason: "not now" });
  channel.push({ type: "ControlState", controller: "me", epoch: 2, you: true });
  channel.push({ type: "ControlState", controller: null, epoch: 1, you: false }); // stale
  channel.push({ type: "Resize", cols: 100, rows: 30 });
  channel.push({ type: "Ended", exit_code: 0, signal: null, message: "" });
  const ended = await viewer.run({ cols: 80, rows: 24 });
  assert.equal(ended.exit_code, 0);
  assert.deepEqual(channel.sent[0], { type: "Join", from_offset: null, cols: 80, rows: 24 });
  assert.equal(screen.text, "hello$ ls\r\nfile\r\n");
  assert.deepEqual(screen.size, [100, 30]);
  assert.deepEqual(denied, ["not now"]);
  assert.deepEqual(states.map((s) => s.you), [false, true]);
  assert.ok(channel.closed);
});

test("input goes out only while this viewer controls the terminal", async () => {
  const channel = new FakeChannel("s1");
  const viewer = new TerminalViewer(channel, recorder());
  assert.equal(await viewer.input("rm -rf /\r"), false);
  assert.deepEqual(channel.sent, []);
  viewer.handle({ type: "ControlState", controller: "me", epoch: 1, you: true });
  assert.equal(await viewer.input("x".repeat(40000)), true);
  assert.deepEqual(channel.sent.map((m) => m.data.length), [16384, 16384, 7232]);
  viewer.handle({ type: "ControlState", controller: null, epoch: 2, you: false });
  assert.equal(await viewer.input("y"), false);
});

test("a hostile host: output before any snapshot, a gap, a disagreeing snapshot part, a viewer message", () => {
  const cases = [
    [[{ type: "Output", offset: 0, data: enc("x") }], wire.ErrorCode.UNEXPECTED_MESSAGE],
    [[{ type: "Snapshot", offset: 0, cols: 2, rows: 2, final: true, data: enc("") }, { type: "Output", offset: 5, data: enc("x") }], wire.ErrorCode.BAD_MESSAGE],
    [[{ type: "Snapshot", offset: 0, cols: 2, rows: 2, final: false, data: enc("") }, { type: "Snapshot", offset: 1, cols: 2, rows: 2, final: true, data: enc("") }], wire.ErrorCode.BAD_MESSAGE],
    [[{ type: "Join", from_offset: null, cols: 0, rows: 0 }], wire.ErrorCode.UNEXPECTED_MESSAGE],
  ];
  for (const [messages, code] of cases) {
    const viewer = new TerminalViewer(new FakeChannel(), recorder());
    assert.throws(() => messages.forEach((m) => viewer.handle(m)), (err) => err.code === code);
  }
});

test("terminal queries and clipboard writes from the shared program are dropped", () => {
  assert.equal(filterQueries("a\x1b[cb\x1b[6nc\x1b]52;c;aGk=\x07d\x1b[0m"), "abcd\x1b[0m");
});
