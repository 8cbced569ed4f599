// The chat page: conversations in localStorage, answers streamed from this server's /v1/chat/completions (SSE),
// rendered through markdown.js (DOM nodes only, never HTML strings). It talks to no other origin.
"use strict";

(function () {
  const STORE = "openelm-mlx.conversations";
  const CURRENT = "openelm-mlx.current";
  const SETTINGS = "openelm-mlx.settings";
  // The key lives in sessionStorage: it survives a reload but not the tab, and is never written to disk
  // for the next person at this browser (conversations are, in localStorage).
  const KEY = "openelm-mlx.api-key";
  const $ = (id) => document.getElementById(id);
  const ui = {
    list: $("conversations"), messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    error: $("error"), system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"),
    maxTokens: $("max-tokens"), penalty: $("repetition-penalty"), limits: $("limits"), key: $("api-key"),
    keyRow: $("api-key-row"), load: $("server-load"), model: $("model-name"), settings: $("settings"),
  };
  let conversations = load(STORE, []);
  let current = localStorage.getItem(CURRENT);
  let running = null; // {controller, conversation, message} while an answer streams

  function load(name, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(name));
      return value === null ? fallback : value;
    } catch (e) {
      return fallback;
    }
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(conversations));
      localStorage.setItem(CURRENT, current || "");
    } catch (e) {
      showError("could not save the conversations in this browser: " + e.message);
    }
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(label, onClick, cls) {
    const b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  // ------------------------------------------------------------ conversations

  function conversation() {
    let c = conversations.find((x) => x.id === current);
    if (!c) {
      c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat", system: "", messages: [] };
      conversations.unshift(c);
      current = c.id;
      save();
    }
    if (!Array.isArray(c.messages)) c.messages = [];
    return c;
  }

  function newChat() {
    if (running) return;
    current = null;
    conversation();
    renderAll();
    document.body.classList.remove("show-sidebar");
    ui.input.focus();
  }

  function deleteChat() {
    if (running) return;
    conversations = conversations.filter((x) => x.id !== current);
    current = conversations.length ? conversations[0].id : null;
    save();
    renderAll();
  }

  function exportChat() {
    const c = conversation();
    const blob = new Blob([JSON.stringify(c, null, 2)], { type: "application/json" });
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = "chat-" + c.id + ".json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  function renderList() {
    ui.list.replaceChildren();
    for (const c of conversations) {
      const li = el("li", c.id === current ? "current" : "");
      li.appendChild(button(String(c.title || "New chat"), () => {
        if (running) return;
        current = c.id;
        save();
        renderAll();
        document.body.classList.remove("show-sidebar");
      }));
      ui.list.appendChild(li);
    }
  }

  // ------------------------------------------------------------ messages

  function meta(m) {
    const parts = [];
    if (m.tokens) parts.push(m.tokens + " tokens");
    if (m.tps) parts.push(m.tps.toFixed(1) + " tokens/s");
    if (m.finish) parts.push("finish: " + m.finish);
    return parts.join(" \u00b7 ");
  }

  function renderMessage(c, m, index) {
    const box = el("div", "message " + (m.role === "user" ? "user" : "assistant"));
    box.dataset.index = String(index);
    const body = el("div", "content");
    body.appendChild(window.renderMarkdown(String(m.content || "")));
    box.appendChild(body);
    const foot = el("div", "meta");
    if (m.role === "assistant") foot.appendChild(el("span", "stats", meta(m)));
    const last = index === c.messages.length - 1;
    if (!running) {
      if (m.role === "user") foot.appendChild(button("Edit", () => editMessage(box, c, index), "edit"));
      if (m.role === "assistant" && last) {
        foot.appendChild(button("Regenerate", () => regenerate(c), "regenerate"));
        if (m.finish === "length" || m.finish === "stopped") {
          foot.appendChild(button("Continue", () => continueAnswer(c), "continue"));
        }
      }
    }
    box.appendChild(foot);
    return box;
  }

  function renderMessages() {
    const c = conversation();
    ui.messages.replaceChildren(...c.messages.map((m, i) => renderMessage(c, m, i)));
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function renderAll() {
    const c = conversation();
    ui.system.value = typeof c.system === "string" ? c.system : "";
    renderList();
    renderMessages();
  }

  function editMessage(box, c, index) {
    const area = el("textarea", "edit-input");
    area.value = c.messages[index].content;
    const row = el("div", "row");
    row.appendChild(button("Send", () => {
      c.messages = c.messages.slice(0, index);
      c.messages.push({ role: "user", content: area.value });
      save();
      generate(c, false);
    }, "resend"));
    row.appendChild(button("Cancel", renderMessages));
    box.replaceChildren(area, row);
    area.focus();
  }

  function regenerate(c) {
    if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
    generate(c, false);
  }

  function continueAnswer(c) {
    generate(c, true);
  }

  function sendInput() {
    const text = ui.input.value;
    if (running || !text.trim()) return;
    const c = conversation();
    if (!c.messages.length) c.title = text.trim().slice(0, 40);
    c.messages.push({ role: "user", content: text });
    ui.input.value = "";
    save();
    generate(c, false);
  }

  // ------------------------------------------------------------ the API

  function numberOf(input, name) {
    const value = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(value)) throw new Error(name + ": not a number");
    return value;
  }

  function requestBody(c, resume) {
    const messages = [];
    if (c.system.trim()) messages.push({ role: "system", content: c.system });
    for (const m of c.messages) messages.push({ role: m.role, content: m.content });
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberOf(ui.temperature, "temperature"),
      top_p: numberOf(ui.topP, "top-p"),
      max_tokens: numberOf(ui.maxTokens, "max tokens"),
    };
    const penalty = numberOf(ui.penalty, "repetition penalty");
    if (penalty !== 1) body.repetition_penalty = penalty;
    if (resume) body.continue_final_message = true;
    return body;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return response.status + ": " + (body.error && body.error.message ? body.error.message : response.statusText);
    } catch (e) {
      return response.status + ": " + response.statusText;
    }
  }

  // Stream one answer into the conversation: a new assistant message, or the last one when `resume`.
  async function generate(c, resume) {
    hideError();
    let body;
    try {
      c.system = ui.system.value;
      body = requestBody(c, resume);
    } catch (e) {
      showError(e.message);
      return;
    }
    let m = resume ? c.messages[c.messages.length - 1] : { role: "assistant", content: "", tokens: 0 };
    if (!resume) c.messages.push(m);
    const controller = new AbortController();
    running = { controller, conversation: c, message: m };
    setRunning(true);
    renderMessages();
    const box = ui.messages.lastElementChild;
    const started = performance.now();
    let first = null;
    let usage = null;
    let finish = null;
    let pending = false;
    const paint = () => {
      pending = false;
      box.querySelector(".content").replaceChildren(window.renderMarkdown(m.content));
      ui.messages.scrollTop = ui.messages.scrollHeight;
    };
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const event of serverEvents(response)) {
        if (event.error) throw new Error(event.error.message || "generation failed");
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          m.content += piece;
          if (!pending) {
            pending = true;
            requestAnimationFrame(paint);
          }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      m.finish = finish || "unknown";
    } catch (e) {
      if (e.name === "AbortError") m.finish = "stopped";
      else {
        m.finish = "error";
        showError(e.message);
      }
    } finally {
      const seconds = (performance.now() - (first === null ? started : first)) / 1000;
      const tokens = usage ? usage.completion_tokens : null;
      if (tokens !== null) {
        m.tokens = (resume ? m.tokens || 0 : 0) + tokens;
        m.tps = tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : 0;
      }
      if (!resume && !m.content && m.finish === "error") c.messages.pop();
      running = null;
      setRunning(false);
      save();
      renderAll();
      refreshLoad();
    }
  }

  // The parsed `data:` events of an SSE response, until `data: [DONE]`.
  async function* serverEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function stop() {
    if (running) running.controller.abort();
  }

  function setRunning(on) {
    ui.send.hidden = on;
    ui.stop.hidden = !on;
    document.body.classList.toggle("running", on);
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
  }

  // ------------------------------------------------------------ the server

  async function refreshLoad() {
    try {
      const r = await fetch("metrics", { headers: headers() });
      if (!r.ok) return;
      const m = await r.json();
      ui.load.textContent = m.active + " generating, " + m.queued + " queued";
      ui.limits.textContent = "Server limits: max tokens \u2264 " + m.max_tokens_limit + ", context " +
        m.context_length + " tokens (prompt + answer); temperature \u2265 0 (0: greedy), top-p in (0, 1], " +
        "repetition penalty in (0, 100] (1: off).";
      ui.maxTokens.max = String(m.max_tokens_limit);
      if (Number(ui.maxTokens.value) > m.max_tokens_limit) ui.maxTokens.value = String(m.max_tokens_limit);
    } catch (e) {
      ui.load.textContent = "server unreachable";
    }
  }

  // The model's name; the key field when the server wants a key (asked without one, so it stays shown).
  async function checkServer() {
    try {
      let r = await fetch("v1/models");
      if (r.status === 401) {
        ui.keyRow.hidden = false;
        if (!ui.key.value) ui.settings.hidden = false;
        r = await fetch("v1/models", { headers: headers() });
      }
      if (r.status === 401) {
        ui.settings.hidden = false;
        if (ui.key.value) showError("the API key was refused");
        return;
      }
      const models = await r.json();
      if (models.data && models.data[0]) ui.model.textContent = String(models.data[0].id);
      hideError();
    } catch (e) {
      showError("cannot reach the server: " + e.message);
    }
  }

  // ------------------------------------------------------------ wiring

  function saveSettings() {
    const s = {
      temperature: ui.temperature.value, top_p: ui.topP.value, max_tokens: ui.maxTokens.value,
      repetition_penalty: ui.penalty.value,
    };
    localStorage.setItem(SETTINGS, JSON.stringify(s));
  }

  function restoreSettings() {
    const s = load(SETTINGS, {});
    if (typeof s !== "object" || s === null) return;
    const fields = [[ui.temperature, "temperature"], [ui.topP, "top_p"], [ui.maxTokens, "max_tokens"],
      [ui.penalty, "repetition_penalty"]];
    for (const [input, name] of fields) if (typeof s[name] === "string" && s[name]) input.value = s[name];
  }

  if (!Array.isArray(conversations)) conversations = [];
  conversations = conversations.filter((c) => c && typeof c === "object" && typeof c.id === "string");
  ui.key.value = sessionStorage.getItem(KEY) || "";
  ui.key.addEventListener("change", () => {
    sessionStorage.setItem(KEY, ui.key.value.trim());
    checkServer();
    refreshLoad();
  });
  restoreSettings();
  for (const input of [ui.temperature, ui.topP, ui.maxTokens, ui.penalty]) input.addEventListener("change", saveSettings);
  ui.system.addEventListener("change", () => {
    conversation().system = ui.system.value;
    save();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    sendInput();
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendInput();
    }
  });
  ui.stop.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("delete-chat").addEventListener("click", deleteChat);
  $("export-chat").addEventListener("click", exportChat);
  $("toggle-settings").addEventListener("click", () => (ui.settings.hidden = !ui.settings.hidden));
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.add("show-sidebar"));
  $("close-sidebar").addEventListener("click", () => document.body.classList.remove("show-sidebar"));
  renderAll();
  checkServer();
  refreshLoad();
  // Load is refreshed after each answer and now and then (not often: each call is a line in the access log).
  setInterval(() => {
    if (!document.hidden && !running) refreshLoad();
  }, 30000);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshLoad();
  });
})();
