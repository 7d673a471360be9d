"use strict";
// The page `gpt2 serve` answers at /: the Playground (POST /v1/completions, streamed) and
// Inspect (POST /v1/score and POST /tokenize, drawn by gltr.js), over the server's public API
// only. With --api-key the key is asked for, kept in sessionStorage (this tab only) and sent as
// `Authorization: Bearer KEY`. Text from the server or the user is only ever inserted as text.
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "gpt2cli-api-key";
  const settings = JSON.parse(document.body.dataset.gltr); // rank buckets, from gpt2cli.output

  class APIError extends Error {}

  // A request to the server; a non-2xx answer is thrown as its error message (401: the key
  // panel opens too).
  async function api(path, body, signal) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    const init = {
      method: body === undefined ? "GET" : "POST",
      headers,
      signal,
      cache: "no-store",
    };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.ok) return response;
    let message = response.status + " " + response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch (e) {
      // not OpenAI's error body: the status says it
    }
    if (response.status === 401) askForKey(Boolean(key));
    throw new APIError(message);
  }

  function askForKey(rejected) {
    $("key-message").textContent = rejected
      ? "The server did not accept that API key: check it and enter it again."
      : "This server needs an API key (it runs with --api-key): enter it to use the page.";
    $("key-panel").hidden = false;
    $("api-key").focus();
  }

  async function loadModel() {
    try {
      const models = await (await api("/v1/models")).json();
      const model = models.data[0];
      const name = model.id.startsWith("/") ? model.id.split("/").pop() : model.id; // a folder
      $("model").textContent = name + " · " + model.max_model_len + " tokens of context";
      $("model").title = model.id;
      $("key-panel").hidden = true;
    } catch (e) {
      if (!(e instanceof APIError)) throw e;
    }
  }

  // Views: #playground (the default) and #inspect-view, chosen by the address's fragment
  function showView() {
    const inspect = location.hash === "#inspect-view";
    $("playground").hidden = inspect;
    $("inspect-view").hidden = !inspect;
    $("tab-playground").setAttribute("aria-current", String(!inspect));
    $("tab-inspect").setAttribute("aria-current", String(inspect));
  }

  // Playground options, from options.json: an option the API gains is one entry there
  let fields = [];

  function addOption(field) {
    const id = "opt-" + field.name;
    let input;
    if (field.type === "lines") {
      input = document.createElement("textarea");
      input.rows = 2;
    } else {
      input = document.createElement("input");
      input.type =
        field.type === "boolean" ? "checkbox" : field.type === "text" ? "text" : "number";
      for (const k of ["min", "max", "step"]) if (field[k] !== undefined) input[k] = field[k];
      if (field.type === "integer" && field.step === undefined) input.step = 1;
      if (field.type === "number" && field.step === undefined) input.step = "any";
    }
    input.id = id;
    input.name = field.name;
    if (field.type === "boolean") input.checked = Boolean(field.value);
    else if (field.value !== undefined && field.value !== null) input.value = field.value;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = field.label;
    const wrap = document.createElement("div");
    wrap.className = "option " + field.type;
    wrap.append(label, input);
    if (field.help) {
      const help = document.createElement("small");
      help.textContent = field.help;
      help.id = id + "-help";
      input.setAttribute("aria-describedby", help.id);
      wrap.append(help);
    }
    $("options").append(wrap);
  }

  const unescape = (line) =>
    line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);

  // The request's options: what is empty is left out (the server's default); what is not a
  // number goes as typed, for the server to say what is wrong with it
  function optionValues() {
    const body = {};
    for (const field of fields) {
      const input = $("opt-" + field.name);
      if (field.type === "boolean") {
        if (input.checked) body[field.name] = true;
        continue;
      }
      const raw = input.value;
      if (field.type === "lines") {
        const lines = raw
          .split("\n")
          .filter((line) => line !== "")
          .map(unescape);
        if (lines.length) body[field.name] = lines;
      } else if (raw.trim() !== "") {
        const value = field.type === "text" ? raw : Number(raw);
        body[field.name] = Number.isNaN(value) ? raw : value;
      }
    }
    return body;
  }

  let controller = null; // the running generation's, while one runs

  function setRunning(running) {
    $("stop").setAttribute("aria-disabled", String(!running));
    $("generate").setAttribute("aria-disabled", String(running));
  }

  async function generate(event) {
    event.preventDefault();
    if (controller) return;
    $("generate-error").textContent = "";
    const body = {
      prompt: $("prompt").value,
      ...optionValues(),
      stream: true,
      stream_options: { include_usage: true },
    };
    const output = $("output");
    output.replaceChildren();
    const samples = [];
    const n = Number.isInteger(body.n) && body.n > 0 ? body.n : 1;
    for (let i = 0; i < n; i++) {
      const caption = document.createElement("div");
      caption.className = "caption muted";
      caption.textContent = n > 1 ? "Sample " + (i + 1) : "";
      const text = document.createElement("pre");
      text.className = "sample-text";
      const sample = document.createElement("div");
      sample.className = "sample";
      sample.append(caption, text);
      output.append(sample);
      samples.push({ caption, text, echoed: !body.echo });
    }
    output.classList.toggle("several", n > 1);
    controller = new AbortController();
    setRunning(true);
    const start = performance.now();
    let first = null;
    let tokens = 0;
    const stats = (end) => {
      const now = performance.now();
      const parts = [];
      if (first !== null) parts.push("first token " + Math.round(first - start) + " ms");
      if (tokens > 1) parts.push(((1000 * (tokens - 1)) / (now - first)).toFixed(1) + " tokens/s");
      parts.push(tokens + (tokens === 1 ? " token" : " tokens"));
      if (end) parts.push(end);
      $("stats").textContent = parts.join(" · ");
    };
    const onEvent = (event) => {
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          $("generate-error").textContent = chunk.error.message;
          continue;
        }
        for (const choice of chunk.choices || []) {
          const sample = samples[choice.index];
          if (!sample) continue;
          if (!sample.echoed) {
            sample.echoed = true; // the first chunk with echo is the prompt, not a token
            const prompt = document.createElement("span");
            prompt.className = "echo";
            prompt.textContent = choice.text;
            sample.text.append(prompt);
          } else {
            tokens++;
            if (first === null) first = performance.now();
            sample.text.append(choice.text);
          }
          if (choice.finish_reason) {
            const why = choice.finish_reason === "length" ? "ended: max tokens" : "ended: stop";
            sample.caption.textContent =
              (n > 1 ? "Sample " + (choice.index + 1) + " · " : "") + why;
          }
        }
      }
      stats();
    };
    try {
      const response = await api("/v1/completions", body, controller.signal);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
      stats("done");
    } catch (e) {
      if (e.name === "AbortError") stats("stopped");
      else {
        $("generate-error").textContent = e.message;
        $("stats").textContent = "";
      }
    } finally {
      controller = null;
      setRunning(false);
    }
  }

  function stop() {
    if (controller) controller.abort(); // the server sees the connection close and frees the slot
  }

  async function inspect(event) {
    event.preventDefault();
    const text = $("inspect-text").value;
    $("inspect-error").textContent = "";
    $("inspect-status").textContent = "scoring…";
    try {
      const [score, tokenized] = await Promise.all([
        api("/v1/score", { text }).then((r) => r.json()),
        api("/tokenize", { content: text, with_pieces: true }).then((r) => r.json()),
      ]);
      const ids = tokenized.tokens.map((t) => t.id);
      if (ids.length !== score.tokens.length || ids.some((id, i) => id !== score.tokens[i].id)) {
        throw new APIError("/tokenize and /v1/score gave different tokens for this text");
      }
      const pieces = tokenized.tokens.map((t) => t.piece);
      window.GLTR.render($("inspect-result"), { score, pieces, settings });
      $("inspect-status").textContent = "";
    } catch (e) {
      $("inspect-error").textContent = e.message;
      $("inspect-status").textContent = "";
    }
  }

  async function readFile(file) {
    if (file) $("inspect-text").value = await file.text();
  }

  document.addEventListener("DOMContentLoaded", async () => {
    window.addEventListener("hashchange", showView);
    showView();
    $("playground-form").addEventListener("submit", generate);
    $("stop").addEventListener("click", stop);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") stop();
    });
    $("inspect-form").addEventListener("submit", inspect);
    $("inspect-file").addEventListener("change", (e) => readFile(e.target.files[0]));
    const area = $("inspect-text");
    area.addEventListener("dragover", (e) => e.preventDefault());
    area.addEventListener("drop", (e) => {
      e.preventDefault();
      readFile(e.dataTransfer.files[0]);
    });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, $("api-key").value.trim());
      $("api-key").value = "";
      loadModel();
    });
    fields = (await (await fetch("/web/options.json")).json()).fields;
    fields.forEach(addOption);
    await loadModel();
  });
})();
