// The hypha signed envelope (v2) and signed results, for schedulers written in JavaScript: see docs/envelope.md.
//
// Canonical form: RFC 8785 (JCS) through the `canonicalize` package; signature: Ed25519
// through `tweetnacl`; key id: the libp2p peer id of the public key (base58btc, `bs58`).

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";

import * as momoa from "@humanwhocodes/momoa";
import bs58 from "bs58";
import canonicalize from "canonicalize";
import nacl from "tweetnacl";

export const ENVELOPE_HEADER = "hypha_envelope";
export const ENVELOPE_VERSION = 2;
// Identity multihash (0x00, 36 bytes) of a protobuf PublicKey {Type: Ed25519 (0x08 0x01), Data: 32 bytes (0x12 0x20)}.
const PEER_PREFIX = Uint8Array.from([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);

/** The RFC 8785 canonical bytes (UTF-8) of a JSON value. */
export function canonicalBytes(value) {
  return Buffer.from(canonicalize(value), "utf8");
}

/**
 * Throw if a value would not reach a worker as the value that was hashed.
 *
 * JavaScript has one number type; JSON.stringify writes an integer-valued number below 1e21 as
 * an integer literal, which the worker (Python) reads as an integer. RFC 8785 only prints
 * integers within +-(2**53 - 1) exactly, so a larger one (e.g. 2**53, or 1e20) is refused here,
 * as the worker would refuse it: send such numbers as strings.
 */
export function checkTransportable(value, path = "body") {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new Error(`${path}: ${value} is not a JSON number`);
    if (Number.isInteger(value) && !Number.isSafeInteger(value) && Math.abs(value) < 1e21) {
      throw new Error(`${path}: ${value} is an integer beyond +-(2**53 - 1); RFC 8785 cannot sign it exactly, send it as a string`);
    }
  } else if (Array.isArray(value)) {
    value.forEach((item, index) => checkTransportable(item, `${path}[${index}]`));
  } else if (value !== null && typeof value === "object") {
    for (const [key, item] of Object.entries(value)) checkTransportable(item, `${path}.${key}`);
  }
}

/** sha256 (hex) of the canonical {"args": [...], "kwargs": {...}}: what binds an envelope to its message body. */
export function bodyDigest(args, kwargs) {
  const body = { args, kwargs };
  checkTransportable(body);
  return createHash("sha256").update(canonicalBytes(body)).digest("hex");
}

/** The libp2p peer id (12D3KooW...) of a 32-byte Ed25519 public key. */
export function peerId(publicKey) {
  const bytes = new Uint8Array(PEER_PREFIX.length + 32);
  bytes.set(PEER_PREFIX);
  bytes.set(publicKey, PEER_PREFIX.length);
  return bs58.encode(bytes);
}

/** The 32-byte public key a peer id embeds. */
export function publicKeyFromPeerId(id) {
  const raw = bs58.decode(id);
  if (raw.length !== 38 || !PEER_PREFIX.every((byte, i) => raw[i] === byte)) throw new Error(`${id} is not an Ed25519 peer id`);
  return raw.slice(PEER_PREFIX.length);
}

/** A key pair from a 32-byte seed (what hypha-celery's key files hold, in base64). */
export function keyFromSeed(seed) {
  if (seed.length !== 32) throw new Error(`an Ed25519 seed is 32 bytes, got ${seed.length}`);
  return nacl.sign.keyPair.fromSeed(Uint8Array.from(seed));
}

/** Read a key file written by `hypha-celery keys generate` / generate_key: one line, the base64 seed. */
export function loadKeyFile(path) {
  return keyFromSeed(Buffer.from(readFileSync(path, "utf8").trim(), "base64"));
}

/** The signed envelope for one task message; `now` (unix seconds) and `nonce` only for test vectors. */
export function signEnvelope(keyPair, { task, id, args = [], kwargs = {}, ttl = 300, now, nonce, modelSha256 }) {
  const issuedAt = now ?? Date.now() / 1000;
  const envelope = {
    v: ENVELOPE_VERSION,
    key_id: peerId(keyPair.publicKey),
    task,
    id,
    model: kwargs.model ?? null,
    requirements: kwargs.requirements ?? null,
    body_sha256: bodyDigest(args, kwargs),
    issued_at: issuedAt,
    expires_at: issuedAt + ttl,
    nonce: nonce ?? randomBytes(16).toString("hex"),
  };
  if (modelSha256 !== undefined && modelSha256 !== null) {
    if (!/^[0-9a-f]{64}$/.test(modelSha256)) throw new Error("model_sha256 must be 64 lowercase hex characters");
    envelope.model_sha256 = modelSha256;
  }
  const signature = nacl.sign.detached(canonicalBytes(envelope), keyPair.secretKey);
  return { ...envelope, signature: Buffer.from(signature).toString("base64") };
}

/** Check an envelope's signature against the key its key_id names (what a worker does first). */
export function verifySignature(envelope) {
  const { signature, ...signed } = envelope;
  return nacl.sign.detached.verify(canonicalBytes(signed), Buffer.from(signature, "base64"), publicKeyFromPeerId(envelope.key_id));
}

// --- Signed results (docs/envelope.md, "Signed results"): the worker's attestation in a task's result.

export const ATTESTATION = "attestation";
export const ATTESTATION_VERSION = 1;
const ATTESTATION_FIELDS = ["v", "task_id", "task", "request_sha256", "result_sha256", "worker", "peer"];

/** sha256 (hex) of a JSON value's RFC 8785 form. */
export function digest(value) {
  checkTransportable(value, "value");
  return createHash("sha256").update(canonicalBytes(value)).digest("hex");
}

/** The digest a result's request_sha256 names: of the bytes the scheduler signed (the envelope less its signature). */
export function requestDigest(envelope) {
  if (envelope == null) return null;
  const { signature, ...signed } = envelope;
  return digest(signed);
}

/**
 * Check a stored result's attestation; return the signing worker's peer id, or throw naming why.
 * `allowed`: peer ids of the workers trusted to answer (undefined: any that signs correctly);
 * `requestDigest`: requestDigest(the envelope sent); `taskName`: the task asked for.
 */
export function verifyResult(result, taskId, { allowed, requestDigest: sent, taskName } = {}) {
  const fail = (why) => { throw new Error(`InvalidSignature: task ${taskId}: ${why}`); };
  if (result === null || typeof result !== "object" || Array.isArray(result)) fail("the result is not an object");
  const statement = result[ATTESTATION];
  if (statement === null || typeof statement !== "object") fail("the result carries no attestation");
  const fields = Object.keys(statement).sort().join(",");
  if (fields !== [...ATTESTATION_FIELDS, "signature"].sort().join(",")) fail("the attestation is malformed");
  if (statement.v !== ATTESTATION_VERSION) fail(`unknown attestation version ${statement.v}`);
  const { signature, ...signed } = statement;
  let publicKey;
  try {
    publicKey = publicKeyFromPeerId(statement.peer);
  } catch {
    fail(`the attestation's peer ${statement.peer} is not a worker peer id`);
  }
  if (!nacl.sign.detached.verify(canonicalBytes(signed), Buffer.from(signature, "base64"), publicKey)) {
    fail(`bad result signature for worker ${statement.peer}`);
  }
  if (statement.task_id !== taskId) fail(`the result was signed for task id ${statement.task_id}`);
  if (taskName !== undefined && statement.task !== taskName) fail(`the result was signed for task ${statement.task}`);
  if (sent !== undefined && statement.request_sha256 !== sent) fail("the result answers another request than the one sent");
  const { [ATTESTATION]: _, ...body } = result;
  if (digest(body) !== statement.result_sha256) fail(`the result was changed after worker ${statement.peer} signed it`);
  if (allowed !== undefined && !allowed.includes(statement.peer)) {
    fail(`the result was signed by worker ${statement.peer}, which is not among the allowed workers`);
  }
  return statement.peer;
}

// --- One JSON meaning: JSON.parse keeps the last of two equal keys, other readers the first.

/** The first object key the JSON text repeats, else null (through momoa's JSON syntax tree). */
export function duplicateKey(text) {
  const stack = [momoa.parse(text).body];
  while (stack.length > 0) {
    const node = stack.pop();
    if (node.type === "Object") {
      const seen = new Set();
      for (const member of node.members) {
        if (seen.has(member.name.value)) return member.name.value;
        seen.add(member.name.value);
        stack.push(member.value);
      }
    } else if (node.type === "Array") {
      for (const element of node.elements) stack.push(element.value);
    }
  }
  return null;
}
