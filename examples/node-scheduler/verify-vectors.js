#!/usr/bin/env node
// Check docs/envelope-vectors/ with this independent implementation (canonicalize + tweetnacl + bs58 + momoa):
// every canonical byte string, digest, key id and signature must be reproduced exactly, every signed
// result verified (and refused once changed), and every refused vector refused. Usage: node
// verify-vectors.js [DIR]; exit 0 when all agree.

import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import {
  bodyDigest, canonicalBytes, digest, duplicateKey, keyFromSeed, peerId, requestDigest, signEnvelope, verifyResult,
  verifySignature,
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

function checkResult(vec) {
  const name = vec.name;
  const key = keyFromSeed(Buffer.from(vec.seed_hex, "hex"));
  expect(name, "peer", peerId(key.publicKey), vec.peer);
  expect(name, "result canonical text", canonicalBytes(vec.result).toString("utf8"), vec.result_canonical);
  expect(name, "result_sha256", digest(vec.result), vec.result_sha256);
  expect(name, "request_sha256", requestDigest(vec.request), vec.request_sha256);
  const { signature, ...statement } = vec.signed_result.attestation;
  expect(name, "statement canonical bytes", canonicalBytes(statement).toString("hex"), vec.statement_canonical_hex);
  expect(name, "signature (hex)", Buffer.from(signature, "base64").toString("hex"), vec.signature_hex);
  try {
    const signer = verifyResult(vec.signed_result, vec.task_id, {
      allowed: [vec.peer], requestDigest: vec.request_sha256, taskName: vec.task,
    });
    expect(name, "signer", signer, vec.peer);
  } catch (error) {
    fail(name, `the committed signed result does not verify: ${error.message}`);
  }
  const changed = { ...vec.signed_result, output: [[1.0]] };
  try {
    verifyResult(changed, vec.task_id);
    fail(name, "a result with its output changed still verifies");
  } catch (error) {
    if (!error.message.includes("changed after worker")) fail(name, `unexpected refusal: ${error.message}`);
  }
}

function checkDuplicates(vec) {
  const name = vec.name;
  expect(name, "body duplicate", duplicateKey(vec.body_json), vec.body_duplicate);
  expect(name, "envelope duplicate", duplicateKey(vec.envelope_json), vec.envelope_duplicate);
}

for (const file of files) {
  const vec = JSON.parse(readFileSync(join(dir, file), "utf8"));
  const name = vec.name;
  if (vec.kind === "result" || vec.kind === "duplicate-key") {
    const before = failed.size;
    (vec.kind === "result" ? checkResult : checkDuplicates)(vec);
    if (failed.size === before) console.log(`ok   ${name}`);
    continue;
  }
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
