// Setting up WebRTC sessions through the server's WebSocket (docs/protocol.md "WebRTC
// transport", server-api.md "Signal payloads"): the page dials an agent (send a file, watch a
// terminal) or answers an agent that dials it (receive a file). Either way the DTLS
// certificate is the identity: the page's is its enrolled RTCCertificate, and an agent's
// SDP fingerprint must be the device id the server vouches for.
import { RtcConnection, SUBPROTOCOL, CONTROL_LABEL, dialSession, acceptSession, serveStream } from "./rtc.js";
import { ErrorCode, randomHex } from "./wire.js";

const ANSWER_TIMEOUT_MS = 20000;
const CONNECT_TIMEOUT_MS = 30000;
const MAX_REMOTE_CANDIDATES = 16;

/** The sha-256 fingerprints an SDP names, as device ids (lowercase hex, no colons). */
export function sdpFingerprints(sdp) {
  const found = new Set();
  for (const m of sdp.matchAll(/^a=fingerprint:sha-256 ([0-9A-Fa-f:]{95})\s*$/gm)) found.add(m[1].replaceAll(":", "").toLowerCase());
  return found;
}

const b64url = (text) => Uint8Array.from(atob(text.replaceAll("-", "+").replaceAll("_", "/") + "===".slice((text.length + 3) % 4)), (c) => c.charCodeAt(0));

/**
 * Checks a capability token as the page can (server-api.md "Capability tokens"): the Ed25519
 * signature with the server's keys from enrolment, `iss`, `aud` = this page, `sub` = the peer
 * the server says sent it, the scope and the time. Throws an Error with the reason.
 */
export async function checkToken(token, { keys, serverId, audience, subject, scope = "p2p:connect", now = Date.now() / 1000 }) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) throw new Error("not a token");
  let header;
  let claims;
  try {
    header = JSON.parse(new TextDecoder().decode(b64url(parts[0])));
    claims = JSON.parse(new TextDecoder().decode(b64url(parts[1])));
  } catch { throw new Error("not a token"); }
  if (header.alg !== "EdDSA" || header.typ !== "mesh-cap+jwt") throw new Error("wrong token type");
  const key = (keys || []).find((k) => k.kid === header.kid);
  if (!key) throw new Error("unknown signing key");
  let verified;
  try {
    const publicKey = await crypto.subtle.importKey("jwk", { kty: "OKP", crv: "Ed25519", x: key.x }, { name: "Ed25519" }, false, ["verify"]);
    verified = await crypto.subtle.verify({ name: "Ed25519" }, publicKey, b64url(parts[2]), new TextEncoder().encode(`${parts[0]}.${parts[1]}`));
  } catch (err) {
    if (err?.name !== "NotSupportedError") throw new Error("bad signature");
    verified = null; // no Ed25519 in this browser: the claims below and DTLS still hold
  }
  if (verified === false) throw new Error("bad signature");
  if (serverId && claims.iss !== serverId) throw new Error("wrong issuer");
  if (claims.aud !== audience) throw new Error("wrong audience");
  if (claims.sub !== subject) throw new Error("wrong holder");
  if (claims.scope !== scope) throw new Error("wrong scope");
  if (!(claims.exp + 10 >= now && claims.nbf - 10 <= now)) throw new Error("expired");
  return claims;
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} timed out`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * The page's WebRTC peers: `dial(peerId)` for a session with an agent; offers from agents are
 * answered when their token checks out, and `onIncoming(session, peerId)` hears each one.
 * `onSignal(frame)` takes the WebSocket's `signal` frames.
 */
export class Peers {
  constructor({ session, link, cert, iceServers, onIncoming, onChannel }) {
    this.session = session;
    this.link = link;
    this.cert = cert;
    this.iceServers = iceServers;
    this.onIncoming = onIncoming;
    this.onChannel = onChannel; // (hello, channel, peerId) -> bool: accept a stream the agent opened
    this.attempts = new Map(); // `${peer}/${attempt}` -> {pc, answer: resolver, candidates}
    this.sessions = new Map(); // peerId -> Promise<MeshSession> (dialled)
    this.answering = new Map(); // `${peer}/${attempt}` -> {pc, candidates}: offers being answered
  }

  _pc() {
    return new RTCPeerConnection({ iceServers: this.iceServers, certificates: [this.cert] });
  }

  _trickle(pc, peerId, attempt) {
    pc.addEventListener("icecandidate", (event) => {
      const c = event.candidate;
      this.link.send({
        type: "signal", to: peerId,
        payload: { webrtc: "candidate", attempt, candidate: c ? c.candidate : "", ...(c?.sdpMid != null ? { sdpMid: c.sdpMid } : {}), ...(c?.sdpMLineIndex != null ? { sdpMLineIndex: c.sdpMLineIndex } : {}) },
      });
    });
  }

  /** A session with `peerId`: the live one either side dialed, else a new one. */
  dial(peerId) {
    let pending = this.sessions.get(peerId);
    if (!pending) {
      pending = this._dial(peerId);
      this._keep(peerId, pending);
    }
    return pending;
  }

  _keep(peerId, pending) {
    this.sessions.set(peerId, pending);
    const forget = () => { if (this.sessions.get(peerId) === pending) this.sessions.delete(peerId); };
    pending.then((mesh) => {
      const previous = mesh.connection.onClose;
      mesh.connection.onClose = (err) => { forget(); previous?.(err); };
      if (mesh.connection.closedError) forget();
    }, forget);
  }

  async _dial(peerId) {
    const token = await this.session.capability(peerId, "p2p:connect");
    const pc = this._pc();
    const control = pc.createDataChannel(CONTROL_LABEL, { ordered: true, protocol: SUBPROTOCOL });
    const attempt = randomHex(8);
    const key = `${peerId}/${attempt}`;
    let answered;
    const answer = new Promise((resolve) => { answered = resolve; });
    this.attempts.set(key, { pc, answered, candidates: 0 });
    try {
      this._trickle(pc, peerId, attempt);
      await pc.setLocalDescription(await pc.createOffer());
      if (!this.link.send({ type: "signal", to: peerId, payload: { webrtc: "offer", attempt, sdp: pc.localDescription.sdp, token } })) {
        throw new Error("not connected to the server");
      }
      const sdp = await withTimeout(answer, ANSWER_TIMEOUT_MS, "the device's answer");
      const prints = sdpFingerprints(sdp);
      if (prints.size !== 1 || !prints.has(peerId)) throw new Error("the answer is not from the device it claims to be");
      await pc.setRemoteDescription({ type: "answer", sdp });
      const connection = new RtcConnection(pc, control, { dialer: true });
      await withTimeout(new Promise((resolve, reject) => {
        if (control.readyState === "open") return resolve();
        control.addEventListener("open", resolve, { once: true });
        control.addEventListener("close", () => reject(new Error("the connection closed")), { once: true });
      }), CONNECT_TIMEOUT_MS, "the connection");
      let established;
      const ready = new Promise((resolve) => { established = resolve; });
      connection.onStream = async (stream) => {
        await ready;
        serveStream(connection, stream, (hello, channel) => this.onChannel(hello, channel, peerId));
      };
      const mesh = await withTimeout(dialSession(connection, [token]), CONNECT_TIMEOUT_MS, "the session handshake");
      established();
      return mesh;
    } catch (err) {
      pc.close();
      throw err;
    } finally {
      this.attempts.delete(key);
    }
  }

  /** A `signal` frame from the server's WebSocket. */
  async onSignal(frame) {
    const from = frame.from;
    const payload = frame.payload || {};
    const attempt = typeof payload.attempt === "string" ? payload.attempt : "";
    if (!attempt || attempt.length > 64) return;
    const key = `${from}/${attempt}`;
    if (payload.webrtc === "answer" && typeof payload.sdp === "string") {
      this.attempts.get(key)?.answered(payload.sdp);
    } else if (payload.webrtc === "candidate") {
      const entry = this.attempts.get(key) || this.answering.get(key);
      if (!entry || typeof payload.candidate !== "string" || payload.candidate.length > 512) return;
      if (++entry.candidates > MAX_REMOTE_CANDIDATES) return;
      await entry.pc.addIceCandidate(payload.candidate ? { candidate: payload.candidate, sdpMid: payload.sdpMid ?? null, sdpMLineIndex: payload.sdpMLineIndex ?? null } : null).catch(() => {});
    } else if (payload.webrtc === "offer" && typeof payload.sdp === "string" && payload.sdp.length <= 32768) {
      await this._answer(from, attempt, payload);
    }
  }

  async _answer(from, attempt, offer) {
    const me = this.session.deviceId;
    const expect = { keys: this.session.state.keys, serverId: this.session.state.server_id, audience: me, subject: from };
    try {
      await checkToken(offer.token, expect);
    } catch (err) {
      console.info(`ignored a webrtc offer from ${from.slice(0, 12)}: ${err.message}`);
      return; // nothing at all goes out for an offer without a good token
    }
    const prints = sdpFingerprints(offer.sdp);
    if (prints.size !== 1 || !prints.has(from)) return;
    const key = `${from}/${attempt}`;
    const pc = this._pc();
    this.answering.set(key, { pc, candidates: 0 });
    const connection = new RtcConnection(pc, null, { dialer: false });
    const accepting = acceptSession(connection, {
      validate: async (hello) => {
        if (!hello.tokens.length) throw Object.assign(new Error("no token"), { code: ErrorCode.BAD_TOKEN });
        await checkToken(hello.tokens[0], expect).catch((err) => { throw Object.assign(err, { code: ErrorCode.BAD_TOKEN }); });
      },
      onChannel: (hello, channel) => this.onChannel(hello, channel, from),
    });
    try {
      this._trickle(pc, from, attempt);
      await pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
      await pc.setLocalDescription(await pc.createAnswer());
      this.link.send({ type: "signal", to: from, payload: { webrtc: "answer", attempt, sdp: pc.localDescription.sdp } });
      const mesh = await withTimeout(accepting, CONNECT_TIMEOUT_MS, "the session handshake");
      this._keep(from, Promise.resolve(mesh)); // the page's own streams to that agent reuse it
      this.onIncoming?.(mesh, from);
    } catch (err) {
      console.info(`a webrtc session from ${from.slice(0, 12)} failed: ${err.message}`);
      pc.close();
    } finally {
      setTimeout(() => this.answering.delete(key), CONNECT_TIMEOUT_MS);
    }
  }
}
