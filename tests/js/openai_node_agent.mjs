// One tool round trip and one structured output through openai-node (chat completions), against
// the base URL and model given as arguments. Prints one JSON line of what it saw; the Python test
// (tests/test_client_matrix.py) checks it. Installed by scripts/ensure-node-clients.sh.
import OpenAI from "openai";

const [baseURL, model, forced, room] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 300_000 });
const weather = {
  type: "function",
  function: {
    name: "weather",
    description: "The weather in a city.",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 16 } },
      required: ["city"],
      additionalProperties: false,
    },
  },
};
const messages = [{ role: "user", content: "What is the weather in Oslo?" }];
const first = await client.chat.completions.create({
  model, messages, tools: [weather], tool_choice: forced === "1" ? "required" : "auto",
  temperature: 0, max_tokens: 48,
});
const call = first.choices[0].message.tool_calls?.[0] ?? null;
let answer = null;
if (call) {
  const second = await client.chat.completions.create({
    model, temperature: 0, max_tokens: 16, tools: [weather],
    messages: [...messages, first.choices[0].message,
      { role: "tool", tool_call_id: call.id, content: "sunny, 21 C" }],
  });
  answer = second.choices[0];
}
const structured = await client.chat.completions.create({
  model, temperature: 0, max_tokens: Number(room),
  messages: [{ role: "user", content: "Which city is the capital of France?" }],
  response_format: {
    type: "json_schema",
    json_schema: {
      name: "city", strict: true,
      schema: { type: "object", properties: { city: { type: "string", maxLength: 24 } },
                required: ["city"], additionalProperties: false },
    },
  },
});
console.log(JSON.stringify({
  call: call && { name: call.function.name, arguments: call.function.arguments },
  finish: first.choices[0].finish_reason,
  answer: answer && { finish: answer.finish_reason, content: answer.message.content },
  structured: structured.choices[0].message.content,
}));
