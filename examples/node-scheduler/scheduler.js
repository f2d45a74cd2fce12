#!/usr/bin/env node
// A hypha scheduler in Node.js: sign a hypha.infer envelope (RFC 8785 + Ed25519), send it with
// celery-node over Redis (Celery protocol 2, the envelope in the `hypha_envelope` header), and read
// the result from the Redis result backend.
//
//   node scheduler.js --key scheduler.key [--broker redis://127.0.0.1:6379/0] [--backend URL]
//                     [--queue hypha] [--model mlp] [--inputs '[[5.1,3.5,1.4,0.2]]'] [--timeout 60]
//                     [--tamper] [--print-key-id] [--verify] [--allow-worker PEER_ID ...]
//                     [--prompt TEXT [--max-new-tokens N]]
//
// The key file is the one `hypha-celery keys generate` writes (a base64 Ed25519 seed); the worker must list
// its peer id (`--print-key-id` prints it) in [worker.security] allowed_schedulers. Prints one JSON
// line {"task_id", "status", "result"} and exits 0 on SUCCESS, 1 otherwise. `--tamper` changes the
// inputs after signing, which a verifying worker must refuse with InvalidSignature. `--verify` checks
// the answering worker's signature over the result (and that it answers this envelope), adding its
// peer id as "signer"; a result that fails is reported as status "INVALID_SIGNATURE" with the reason.
// `--allow-worker` (repeatable, implies --verify) accepts answers only from those workers; without it,
// `--verify` accepts only the peer id the answering worker registered (any key can sign).
// `--prompt` sends hypha.generate instead (give a text-generation --model) and prints the text to stderr
// as it grows, read from the task's token stream with XREAD BLOCK (lib/tokens.js); the JSON line then
// carries the joined pieces as "streamed".

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

import celery from "celery-node";

import {
  ENVELOPE_HEADER, loadKeyFile, peerId, requestDigest, signEnvelope, verifyResult,
} from "./lib/envelope.js";
import { streamTokens, tokenStreamKey } from "./lib/tokens.js";

const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);

const { values: opts } = parseArgs({
  options: {
    key: { type: "string" },
    broker: { type: "string", default: process.env.HYPHA_BROKER_URL ?? "redis://127.0.0.1:6379/0" },
    backend: { type: "string" },
    queue: { type: "string", default: "hypha" },
    model: { type: "string", default: "mlp" },
    inputs: { type: "string", default: "[[5.1,3.5,1.4,0.2]]" },
    timeout: { type: "string", default: "60" },
    tamper: { type: "boolean", default: false },
    "print-key-id": { type: "boolean", default: false },
    verify: { type: "boolean", default: false },
    "allow-worker": { type: "string", multiple: true },
    prompt: { type: "string" },
    "max-new-tokens": { type: "string", default: "16" },
  },
});

if (!opts.key) {
  console.error("usage: node scheduler.js --key FILE [--broker URL] [--queue hypha] [--tamper] (see the header)");
  process.exit(2);
}
const key = loadKeyFile(opts.key);
if (opts["print-key-id"]) {
  console.log(peerId(key.publicKey));
  process.exit(0);
}

const generating = opts.prompt !== undefined;
const task = generating ? "hypha.generate" : "hypha.infer";
const taskId = randomUUID();
const kwargs = generating
  ? { model: opts.model, prompt: opts.prompt, max_new_tokens: Number(opts["max-new-tokens"]) }
  : { model: opts.model, inputs: JSON.parse(opts.inputs) };
const envelope = signEnvelope(key, { task, id: taskId, args: [], kwargs, ttl: 300 });
if (opts.tamper) kwargs.inputs = kwargs.inputs.map((row) => row.map((x) => x + 1)); // after signing

const client = celery.createClient(opts.broker, opts.backend ?? opts.broker, opts.queue);
// celery-node's sendTask takes no headers, so build its protocol-2 message and add ours before sending.
const message = client.createTaskMessage(taskId, task, [], kwargs);
message.headers[ENVELOPE_HEADER] = envelope;
client.sendTaskMessage(task, message);

const deadline = Date.now() + Number(opts.timeout) * 1000;
let streamed;
if (generating) {
  const reader = client.backend.redis.duplicate(); // a blocking XREAD holds its connection
  streamed = "";
  try {
    for await (const piece of streamTokens(reader, tokenStreamKey(taskId), { timeoutMs: deadline - Date.now() })) {
      process.stderr.write(piece);
      streamed += piece;
    }
  } catch (error) {
    console.error(`\n${error.name}: ${error.message}`); // the result below reports the task's error too
  }
  reader.disconnect();
}
let meta = null;
while (Date.now() < deadline) {
  meta = await client.backend.getTaskMeta(taskId);
  if (meta && FINAL.has(meta.status)) break;
  await new Promise((resolve) => setTimeout(resolve, 200));
}
let allowed = opts["allow-worker"];
if (allowed === undefined && opts.verify && meta && meta.status === "SUCCESS") {
  // Any key can sign: without --allow-worker, trust the identity the answering worker registered
  // (its registry record's peer_id; the registry is the result backend's Redis here).
  const worker = meta.result && meta.result.worker;
  const prefix = process.env.HYPHA_KEY_PREFIX || "hypha";
  const registered = typeof worker === "string" ? await client.backend.redis.hget(`${prefix}:worker:${worker}`, "peer_id") : null;
  allowed = registered ? [registered] : [];
}
await client.disconnect();
let status = meta && FINAL.has(meta.status) ? meta.status : "TIMEOUT";
const answer = { task_id: taskId, status, result: meta ? meta.result : null };
if (streamed !== undefined) answer.streamed = streamed;
if (status === "SUCCESS" && allowed !== undefined) {
  try {
    answer.signer = verifyResult(meta.result, taskId, { allowed, requestDigest: requestDigest(envelope), taskName: task });
  } catch (error) {
    status = answer.status = "INVALID_SIGNATURE";
    answer.error = error.message;
  }
}
console.log(JSON.stringify(answer));
process.exit(status === "SUCCESS" ? 0 : 1);
