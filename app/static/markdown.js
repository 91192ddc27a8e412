// A tiny, safe markdown renderer for streamed model output.
// The source is HTML-escaped first; only tags this module writes itself reach the page.
// Supports paragraphs, line breaks, `code`, ``` fences (an unclosed fence renders as code
// while it streams), **bold**, *em*, # headings, - / 1. lists and [links](https://...).

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Placeholders for code spans and links: private-use characters removed from the input.
const MARK = "\uE000";
const STRIP = /[\uE000\uE001]/g;

function inline(escaped) {
  const saved = [];
  const keep = (html) => {
    saved.push(html);
    return `${MARK}${saved.length - 1}\uE001`;
  };
  let s = escaped.replace(/`([^`]+)`/g, (_, code) => keep(`<code>${code}</code>`));
  // Links: http(s) only. The URL is already escaped, so it cannot leave the attribute.
  s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
    keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`),
  );
  s = s.replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__(?=\S)(.+?)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*([^\s*](?:[^*]*[^\s*])?)\*(?!\*)/g, "$1<em>$2</em>");
  // A link's label may hold a code span: expand until no placeholder is left.
  for (let n = 0; n < 3 && s.includes(MARK); n++) {
    s = s.replace(/\uE000(\d+)\uE001/g, (_, i) => saved[Number(i)]);
  }
  return s;
}

/** Markdown source -> an HTML string safe to assign to innerHTML. */
export function renderMarkdown(source) {
  const lines = String(source).replace(STRIP, "").split(/\r\n|\r|\n/);
  const out = [];
  let para = [];
  let list = null; // {tag: "ul" | "ol", items: [...]}

  const flushPara = () => {
    if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (list) {
      const items = list.items.map((it) => `<li>${inline(it)}</li>`).join("");
      out.push(`<${list.tag}>${items}</${list.tag}>`);
    }
    list = null;
  };

  for (let i = 0; i < lines.length; i++) {
    const line = escapeHTML(lines[i]);
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (fence) {
      flushPara();
      flushList();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) {
        code.push(escapeHTML(lines[i]));
        i++;
      }
      const lang = fence[1] ? ` class="language-${fence[1]}"` : "";
      out.push(`<pre><code${lang}>${code.join("\n")}</code></pre>`);
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d{1,9}[.)]\s+(.*)$/.exec(line);
    if (line.trim() === "") {
      flushPara();
      flushList();
    } else if (heading) {
      flushPara();
      flushList();
      const level = Math.min(heading[1].length + 2, 6); // keep headings modest in a chat
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1] += ` ${line.trim()}`; // a continuation line
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}
