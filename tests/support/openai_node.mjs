// What a Node.js application does with the official OpenAI SDK against the gate: one answer,
// one stream with usage, and a request by a user whose balance is gone. Run by
// tests/test_integrity.py with one JSON argument (base URL, key, the two users' headers,
// what the fake upstream should report); prints one JSON object of what the SDK returned.
import OpenAI from "openai";

const config = JSON.parse(process.argv[2]);
const client = (headers) =>
  new OpenAI({ baseURL: config.baseURL, apiKey: config.apiKey, defaultHeaders: headers, maxRetries: 0 });
const messages = [{ role: "user", content: "Olá, tudo bem?" }];
const out = {};

const user = client(config.user);
const answer = await user.chat.completions.create({
  model: "gpt-4o-mini", messages, max_tokens: 20, x_test: config.answer,
});
out.answer = { content: answer.choices[0].message.content, usage: answer.usage };

const stream = await user.chat.completions.create({
  model: "gpt-4o-mini", messages, max_tokens: 30, stream: true,
  stream_options: { include_usage: true }, x_test: config.stream,
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
out.stream = { text, usage };

try {
  await client(config.broke).chat.completions.create({ model: "gpt-4o-mini", messages, max_tokens: 20 });
  out.refused = null;
} catch (error) {
  out.refused = {
    sdkError: error instanceof OpenAI.APIError, status: error.status, type: error.type,
    code: error.code, message: error.error?.message ?? null,
  };
}
process.stdout.write(JSON.stringify(out));
