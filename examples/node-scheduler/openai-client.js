// The official `openai` npm client, unmodified, against `hypha-celery gateway`: models, a chat completion, the same
// chat streamed, and embeddings. Prints one JSON object; exit 1 (with the API's error) when a request fails.
//
//   node openai-client.js --base-url http://127.0.0.1:8000/v1 --api-key sk-... --model tiny-llama \
//       [--prompt "The cat sat on"] [--max-tokens 12] [--embedding-model all-minilm-l6-v2]
import OpenAI from "openai";

function options(argv) {
  const found = { baseUrl: "http://127.0.0.1:8000/v1", apiKey: process.env.OPENAI_API_KEY ?? "", model: "tiny-llama",
                  prompt: "The cat sat on", maxTokens: 12, embeddingModel: null };
  const names = { "--base-url": "baseUrl", "--api-key": "apiKey", "--model": "model", "--prompt": "prompt",
                  "--max-tokens": "maxTokens", "--embedding-model": "embeddingModel" };
  for (let i = 0; i < argv.length; i += 2) {
    const name = names[argv[i]];
    if (name === undefined || i + 1 >= argv.length) throw new Error(`unknown or incomplete option ${argv[i]}`);
    found[name] = name === "maxTokens" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return found;
}

async function main() {
  const opts = options(process.argv.slice(2));
  const client = new OpenAI({ baseURL: opts.baseUrl, apiKey: opts.apiKey, maxRetries: 0, timeout: 180_000 });
  const messages = [{ role: "user", content: opts.prompt }];
  const models = [];
  for await (const model of client.models.list()) models.push(model.id);
  const chat = await client.chat.completions.create({ model: opts.model, messages, temperature: 0,
                                                      max_tokens: opts.maxTokens });
  const stream = await client.chat.completions.create({ model: opts.model, messages, temperature: 0,
                                                        max_tokens: opts.maxTokens, stream: true });
  let streamed = "";
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
  const out = { models, chat: chat.choices[0].message.content, finish_reason: chat.choices[0].finish_reason,
                usage: chat.usage, streamed };
  if (opts.embeddingModel) {
    const embedded = await client.embeddings.create({ model: opts.embeddingModel, input: ["a sentence", "another"] });
    out.embedding_dims = embedded.data.map((d) => d.embedding.length);
  }
  console.log(JSON.stringify(out));
}

main().catch((error) => {
  console.error(error instanceof OpenAI.APIError ? `${error.status} ${error.message}` : String(error));
  process.exit(1);
});
