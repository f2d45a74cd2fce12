// Read a hypha generation's token stream (hypha_celery/token_stream.py: the Redis Stream
// `<prefix>:task:<task_id>:tokens` in the result backend's Redis) with blocking XREAD, as
// hypha_celery.client.stream does in Python: each new piece of text once, until the end entry.
//
// `redis` is an ioredis client (celery-node's result backend brings one: duplicate it, since a
// blocking XREAD holds its connection). Offsets count Unicode code points, as Python's len does.

export function tokenStreamKey(taskId, prefix = process.env.HYPHA_KEY_PREFIX || "hypha") {
  return `${prefix}:task:${taskId}:tokens`;
}

export async function* streamTokens(redis, key, { timeoutMs = 60000, blockMs = 2000, row = 0 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last = "0"; // from the start: works before, while and after the task runs
  let shown = 0; // code points of the row's text yielded so far
  while (Date.now() < deadline) {
    const block = Math.max(1, Math.min(blockMs, deadline - Date.now()));
    const reply = await redis.xread("BLOCK", block, "STREAMS", key, last);
    if (!reply) continue;
    for (const [, entries] of reply) {
      for (const [id, flat] of entries) {
        last = id;
        const fields = {};
        for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
        if (fields.end !== undefined) {
          if (fields.end === "SUCCESS") return;
          const error = new Error(fields.message ?? fields.end);
          error.name = fields.error || fields.end; // a class of hypha_celery.errors
          throw error;
        }
        if (Number(fields.row) !== row) continue;
        const text = Array.from(fields.text ?? "");
        const offset = Number(fields.offset);
        if (offset + text.length > shown) {
          yield text.slice(Math.max(0, shown - offset)).join("");
          shown = offset + text.length;
        }
      }
    }
  }
  throw new Error(`no end of token stream ${key} within ${timeoutMs} ms`);
}
