// A small allow-list markdown renderer for model and user text. It builds DOM nodes with createElement and
// text nodes only: no string of the input is ever parsed as HTML, so `<script>` or `<img onerror>` in the text
// stays text. Supported: paragraphs, # headings, fenced and inline code, **bold**, *italic*, - and 1. lists,
// > quotes, --- rules and [links](https://...) (http and https only, opened with rel=noopener).
// Underscores never make emphasis: `__init__` and snake_case stay as written.
"use strict";

(function () {
  const INLINE = new RegExp(
    [
      "(`+)([^`][\\s\\S]*?)\\1(?!`)", // 1, 2: code span
      "\\[([^\\[\\]\\n]+)\\]\\(([^()\\s]+)\\)", // 3, 4: link
      "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 5: bold
      "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 6: italic
    ].join("|"),
    "g",
  );

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // An http(s) URL as a string, or null for anything else (javascript:, data:, relative paths ...).
  function safeUrl(raw) {
    try {
      const url = new URL(raw);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function inline(text, parent) {
    let last = 0;
    INLINE.lastIndex = 0;
    for (let m; (m = INLINE.exec(text)); ) {
      parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      last = INLINE.lastIndex;
      if (m[1] !== undefined) {
        parent.appendChild(el("code", m[2]));
      } else if (m[3] !== undefined) {
        const href = safeUrl(m[4]);
        if (href === null) {
          parent.appendChild(document.createTextNode(m[0]));
          continue;
        }
        const a = el("a");
        a.href = href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        a.textContent = m[3]; // link text as plain text: markup inside a link is shown, not applied
        parent.appendChild(a);
      } else {
        const node = el(m[5] !== undefined ? "strong" : "em");
        inline(m[5] !== undefined ? m[5] : m[6], node);
        parent.appendChild(node);
      }
      INLINE.lastIndex = last; // the recursion above reused the regex
    }
    parent.appendChild(document.createTextNode(text.slice(last)));
    return parent;
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        const body = [];
        for (i++; i < lines.length && !(lines[i].trim() === m[1]); i++) body.push(lines[i]);
        i++; // the closing fence (or the end of a text still streaming)
        const pre = el("pre");
        const code = el("code", body.join("\n"));
        if (m[2]) code.dataset.lang = m[2];
        pre.appendChild(code);
        parent.appendChild(pre);
      } else if ((m = HEADING.exec(line))) {
        parent.appendChild(inline(m[2], el("h" + Math.min(m[1].length + 2, 6))));
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
        parent.appendChild(blocks(body, el("blockquote")));
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[1]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
        for (; i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered; i++) {
          list.appendChild(inline(m[2], el("li")));
        }
        parent.appendChild(list);
      } else {
        const body = [];
        for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) body.push(lines[i]);
        parent.appendChild(inline(body.join("\n"), el("p")));
      }
    }
    return parent;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  // The rendered text as a DocumentFragment (safe to append: it holds only the allowed elements).
  window.renderMarkdown = function (text) {
    return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), document.createDocumentFragment());
  };
})();
