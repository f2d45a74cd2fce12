#!/usr/bin/env node
// Check docs/envelope-vectors/ with this independent implementation (canonicalize + tweetnacl + bs58):
// every canonical byte string, digest, key id and signature must be reproduced exactly, and every
// refused vector refused. Usage: node verify-vectors.js [DIR]; exit 0 when all agree.

import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import {
  bodyDigest, canonicalBytes, keyFromSeed, peerId, signEnvelope, verifySignature,
} from "./lib/envelope.js";

const here = dirname(fileURLToPath(import.meta.url));
const dir = resolve(process.argv[2] ?? join(here, "..", "..", "docs", "envelope-vectors"));
const files = readdirSync(dir).filter((name) => name.endsWith(".json")).sort();
const failures = [];
const failed = new Set();

function fail(name, message) {
  failed.add(name);
  failures.push(`${name}: ${message}`);
}

function expect(name, what, actual, expected) {
  if (actual !== expected) fail(name, `${what}\n    got      ${actual}\n    expected ${expected}`);
}

for (const file of files) {
  const vec = JSON.parse(readFileSync(join(dir, file), "utf8"));
  const name = vec.name;
  if (vec.refused) {
    let refused = null;
    try {
      bodyDigest(vec.args, vec.kwargs);
    } catch (error) {
      refused = error.message;
    }
    if (refused === null) fail(name, `signed a body that must be refused (${vec.description})`);
    else console.log(`ok   ${name} (refused: ${refused})`);
    continue;
  }
  const before = failed.size;
  const key = keyFromSeed(Buffer.from(vec.seed_hex, "hex"));
  const body = canonicalBytes({ args: vec.args, kwargs: vec.kwargs });
  expect(name, "body canonical bytes", body.toString("hex"), vec.body_canonical_hex);
  expect(name, "body canonical text", body.toString("utf8"), vec.body_canonical);
  expect(name, "body_sha256", bodyDigest(vec.args, vec.kwargs), vec.body_sha256);
  expect(name, "public key", Buffer.from(key.publicKey).toString("hex"), vec.public_key_hex);
  expect(name, "key_id", peerId(key.publicKey), vec.key_id);
  const envelope = signEnvelope(key, {
    task: vec.task, id: vec.task_id, args: vec.args, kwargs: vec.kwargs,
    ttl: vec.expires_at - vec.issued_at, now: vec.issued_at, nonce: vec.nonce, modelSha256: vec.model_sha256,
  });
  const { signature, ...signed } = envelope;
  expect(name, "envelope canonical bytes", canonicalBytes(signed).toString("hex"), vec.envelope_canonical_hex);
  expect(name, "signature", signature, vec.signature);
  expect(name, "signature (hex)", Buffer.from(signature, "base64").toString("hex"), vec.signature_hex);
  expect(name, "envelope as sent", canonicalBytes(envelope).toString("hex"), canonicalBytes(vec.envelope).toString("hex"));
  if (!verifySignature(vec.envelope)) fail(name, `the committed signature does not verify`);
  const altered = { ...vec.envelope, nonce: vec.envelope.nonce.replace(/.$/, (c) => (c === "0" ? "1" : "0")) };
  if (verifySignature(altered)) fail(name, `an altered envelope still verifies`);
  if (failed.size === before) console.log(`ok   ${name}`);
}

if (files.length === 0) failures.push(`no vectors in ${dir}`);
for (const failure of failures) console.error(`FAIL ${failure}`);
console.log(`${files.length - failed.size} of ${files.length} vectors agree (${dir})`);
process.exit(failures.length === 0 ? 0 : 1);
