// A small Markdown renderer that builds DOM nodes: every piece of model or user text becomes a
// text node (textContent), never HTML, so an answer holding <img onerror=...> shows as text.
// Blocks: fenced code, headings, lists, quotes, paragraphs. Inline: `code`, **bold**, *italic*,
// [links](https://...) (http and https only; opened in a new tab without the page's context).

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(\[[^\]\n]+\]\((https?:\/\/[^\s)]+)\))/g;

function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const token = m[0];
    if (m[1]) parent.append(el("code", token.slice(1, -1)));
    else if (m[2]) parent.append(el("strong", token.slice(2, -2)));
    else if (m[3]) parent.append(el("em", token.slice(1, -1)));
    else {
      const a = el("a", token.slice(1, token.indexOf("](")));
      a.href = m[5];
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      parent.append(a);
    }
    last = m.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  return parent;
}

export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^```(\S*)/);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].startsWith("```")) body.push(lines[i++]);
      i += 1;
      const pre = el("pre");
      const code = el("code", body.join("\n"));
      if (fence[1]) code.dataset.lang = fence[1];
      pre.append(code);
      root.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      root.append(inline(el(`h${Math.min(heading[1].length + 2, 6)}`), heading[2]));
      i += 1;
      continue;
    }
    const listItem = /^\s*(?:[-*+]|\d+[.)])\s+/;
    if (listItem.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      while (i < lines.length && listItem.test(lines[i])) list.append(inline(el("li"), lines[i++].replace(listItem, "")));
      root.append(list);
      continue;
    }
    if (line.startsWith(">")) {
      const quote = el("blockquote");
      const body = [];
      while (i < lines.length && lines[i].startsWith(">")) body.push(lines[i++].replace(/^>\s?/, ""));
      quote.append(inline(el("p"), body.join("\n")));
      root.append(quote);
      continue;
    }
    if (!line.trim()) { i += 1; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^(```|#{1,6}\s|>)/.test(lines[i]) && !listItem.test(lines[i])) {
      para.push(lines[i++]);
    }
    root.append(inline(el("p"), para.join("\n")));
  }
  return root;
}
