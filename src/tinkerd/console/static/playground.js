// The sampling playground: a prompt (raw text, or chat messages through the model's chat template) sampled by the
// Tinker API's own asample + retrieve_future, each sampled token shaded by its logprob.
"use strict";

async function playgroundPage(main) {
  const { models } = await call("GET", "/console/api/samplables");
  // Base models, then the caller's sampler checkpoints, then those other users published (each one's owner named).
  const option = (m) => h("option", { value: String(models.indexOf(m)) }, m.model_path ? `checkpoint ${m.label}` : `base ${m.label}`);
  const groups = [
    ["Base models", models.filter((m) => !m.model_path)],
    ["Your sampler checkpoints", models.filter((m) => m.model_path && m.mine)],
    ...[...new Set(models.filter((m) => m.model_path && !m.mine).map((m) => m.owner))].map((owner) => [
      `Published by ${owner}`,
      models.filter((m) => m.model_path && !m.mine && m.owner === owner),
    ]),
  ];
  const modelSelect = h(
    "select",
    { id: "pg-model" },
    groups.filter(([, items]) => items.length).map(([label, items]) => h("optgroup", { label }, items.map(option))),
  );
  const mode = h("select", { id: "pg-mode" }, h("option", { value: "raw" }, "Raw text"), h("option", { value: "chat" }, "Chat (chat template)"));
  const raw = h("textarea", { id: "pg-prompt", placeholder: "Prompt text…" }, "");
  const messages = h("div", { id: "pg-messages", hidden: true });
  const addMessage = (role, content) => {
    const row = h(
      "div",
      { class: "message" },
      h("select", { class: "role" }, ["system", "user", "assistant"].map((r) => h("option", { value: r, selected: r === role }, r))),
      h("textarea", { class: "content", placeholder: `${role} message…` }, content || ""),
      h("button", { type: "button", onclick: () => row.remove() }, "✕"),
    );
    messages.insertBefore(row, messages.lastChild);
  };
  messages.append(h("button", { type: "button", id: "pg-add", onclick: () => addMessage("user", "") }, "Add message"));
  addMessage("user", "");
  mode.addEventListener("change", () => {
    raw.hidden = mode.value !== "raw";
    messages.hidden = mode.value !== "chat";
  });
  const param = (name, label, value, attrs) => {
    const input = h("input", { id: `pg-${name}`, type: "number", value, ...(attrs || {}) });
    return [input, h("label", {}, label, input)];
  };
  const [maxTokens, maxTokensL] = param("max_tokens", "max tokens", 32, { min: 1 });
  const [temperature, temperatureL] = param("temperature", "temperature", 1.0, { min: 0, step: 0.1 });
  const [topP, topPL] = param("top_p", "top p", 1.0, { min: 0, max: 1, step: 0.05 });
  const [topK, topKL] = param("top_k", "top k (-1: off)", -1, { step: 1 });
  const [seed, seedL] = param("seed", "seed (empty: random)", "", {});
  const [numSamples, numSamplesL] = param("num_samples", "samples", 1, { min: 1, max: 16 });
  const stop = h("input", { id: "pg-stop", type: "text", placeholder: "e.g. \\n" });
  const button = h("button", { type: "button", class: "primary", id: "pg-sample" }, "Sample");
  const output = h("div", { id: "pg-output" });
  main.replaceChildren(
    h("h1", {}, "Sampling playground"),
    h("div", { class: "card" },
      h("div", { class: "toolbar" }, h("label", {}, "Model ", modelSelect), h("label", {}, "Prompt ", mode)),
      raw,
      messages,
      h("div", { class: "params" }, maxTokensL, temperatureL, topPL, topKL, seedL, numSamplesL, h("label", {}, "stop string", stop)),
      h("div", { class: "toolbar" }, button),
    ),
    output,
  );

  const sampler = { sessionId: null, seq: 0, ids: new Map() };
  // Keep the playground's session alive while the page is open, as the SDK does for its own.
  const heartbeat = setInterval(() => {
    if (sampler.sessionId !== null) call("POST", "/api/v1/session_heartbeat", { session_id: sampler.sessionId }).catch(() => {});
  }, 60_000);
  button.addEventListener("click", async () => {
    const choice = models[Number(modelSelect.value)];
    if (!choice) return;
    button.disabled = true;
    output.replaceChildren(h("p", { class: "muted" }, "Sampling…"));
    try {
      const encodeBody =
        mode.value === "chat"
          ? { model: choice.base_model, messages: [...messages.querySelectorAll(".message")].map((m) => ({ role: m.querySelector(".role").value, content: m.querySelector(".content").value })) }
          : { model: choice.base_model, text: raw.value };
      const encoded = await call("POST", "/console/api/tokenize", encodeBody);
      if (!encoded.tokens.length) throw new Error("the prompt is empty");
      const params = {
        max_tokens: Number(maxTokens.value),
        temperature: Number(temperature.value),
        top_p: Number(topP.value),
        top_k: Number(topK.value),
        seed: seed.value === "" ? null : Number(seed.value),
        stop: stop.value ? [stop.value.replaceAll("\\n", "\n")] : null,
      };
      const request = {
        prompt: { chunks: [{ type: "encoded_text", tokens: encoded.tokens }] },
        sampling_params: params,
        num_samples: Number(numSamples.value),
        sampling_session_id: await samplerFor(sampler, choice),
      };
      const future = await call("POST", "/api/v1/asample", request);
      const result = await awaitFuture(future.request_id);
      const pieces = await Promise.all(
        result.sequences.map((s) => call("POST", "/console/api/detokenize", { model: choice.base_model, tokens: s.tokens })),
      );
      output.replaceChildren(
        h("p", { class: "legend" }, "Each sampled token is shaded by its logprob: dark for likely (logprob near 0), pale for unlikely (−12 or less); hover for the value."),
        ...result.sequences.map((s, i) =>
          h("div", { class: "card sample-card" },
            h("div", { class: "muted" }, `Sample ${i + 1}: ${s.tokens.length} tokens, stopped by ${s.stop_reason}`),
            h("div", { class: "sample" }, h("span", { class: "prompt" }, encoded.pieces.join("")), s.tokens.map((t, j) => tokenSpan(pieces[i].pieces[j], t, s.logprobs[j]))),
          ),
        ),
      );
    } catch (error) {
      output.replaceChildren(h("p", { class: "error" }, `Sampling failed: ${error.message}`));
    } finally {
      button.disabled = false;
    }
  });
  return () => clearInterval(heartbeat);
}

// A sampling client as the SDK makes one: a session (once per visit to the page), then a sampler per model choice.
async function samplerFor(state, choice) {
  const key = choice.model_path || `base:${choice.base_model}`;
  if (state.ids.has(key)) return state.ids.get(key);
  if (state.sessionId === null) {
    const session = await call("POST", "/api/v1/create_session", {
      tags: ["console"],
      user_metadata: { client: "tinkerd console playground" },
      sdk_version: "tinkerd-console",
    });
    state.sessionId = session.session_id;
  }
  const created = await call("POST", "/api/v1/create_sampling_session", {
    session_id: state.sessionId,
    sampling_session_seq_id: state.seq++,
    base_model: choice.model_path ? null : choice.base_model,
    model_path: choice.model_path,
  });
  state.ids.set(key, created.sampling_session_id);
  return created.sampling_session_id;
}

function tokenSpan(text, token, logprob) {
  const span = h("span", { class: "tok", title: `token ${token}, logprob ${fmtNum(logprob)}` }, text);
  // Shade on a log scale (logprob 0 darkest, -12 or below palest): a linear probability scale leaves nearly every
  // token of a small model equally pale.
  const strength = Math.min(1, Math.max(0, 1 + (logprob === undefined ? -12 : logprob) / 12));
  span.style.backgroundColor = `rgba(47, 111, 222, ${(0.06 + 0.6 * strength).toFixed(3)})`;
  span.dataset.logprob = String(logprob);
  return span;
}

async function awaitFuture(requestId) {
  for (;;) {
    const answer = await call("POST", "/api/v1/retrieve_future", { request_id: requestId });
    if (answer && answer.type === "try_again") continue;
    if (answer && answer.error) throw new Error(answer.error);
    return answer;
  }
}
