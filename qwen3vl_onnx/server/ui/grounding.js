// Boxes and points out of a grounding answer, in the pixels of the picture they refer to.
// The same reading as qwen3vl_onnx/runtime/grounding.py (both are tested on tests/data/grounding_answers.json):
// JSON items with bbox_2d [x1, y1, x2, y2] or point_2d [x, y] in 0-1000 coordinates (an optional 1-based
// "picture"; else the last picture), or, where no JSON says anything, the text form label(x1,y1),(x2,y2).
// Anything malformed is skipped.

const SCALE = 1000;
const NUM = String.raw`\s*(\d+(?:\.\d+)?)\s*`;
const TEXT_BOX = new RegExp(String.raw`(?:<\|object_ref_start\|>([^<]*)<\|object_ref_end\|>)?\s*(?:<\|box_start\|>)?` +
  String.raw`\(${NUM},${NUM}\)\s*,\s*\(${NUM},${NUM}\)`, "g");

const clamp = (v) => Math.min(Math.max(v, 0), SCALE);

function numbers(value, n) {
  if (!Array.isArray(value) || value.length !== n) return null;
  if (!value.every((v) => typeof v === "number" && Number.isFinite(v))) return null;
  return value.map(clamp);
}

// Every JSON object or array that starts somewhere in text and parses (outermost first).
function jsonValues(text) {
  const out = [];
  let k = 0;
  while (k < text.length) {
    if (text[k] !== "[" && text[k] !== "{") { k += 1; continue; }
    const end = jsonEnd(text, k);
    if (end < 0) { k += 1; continue; }
    try { out.push(JSON.parse(text.slice(k, end))); k = end; } catch { k += 1; }
  }
  return out;
}

// Where the bracketed value starting at k ends (strings and escapes respected), or -1.
function jsonEnd(text, k) {
  let depth = 0, inString = false;
  for (let i = k; i < text.length; i += 1) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i += 1;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[" || c === "{") depth += 1;
    else if (c === "]" || c === "}") { depth -= 1; if (depth === 0) return i + 1; }
  }
  return -1;
}

function items(value) {
  if (Array.isArray(value)) return value.flatMap(items);
  if (value !== null && typeof value === "object") return [value];
  return [];
}

function ordered(b) { return [Math.min(b[0], b[2]), Math.min(b[1], b[3]), Math.max(b[0], b[2]), Math.max(b[1], b[3])]; }

// [kind, label, 0-1000 coordinates, picture number or null] of each mark in text.
export function relativeMarks(text) {
  const out = [];
  for (const item of jsonValues(text).flatMap(items)) {
    const label = item.label === undefined ? "" : typeof item.label === "string" ? item.label : String(item.label);
    const pic = Number.isInteger(item.picture) && item.picture >= 1 ? item.picture : null;
    const box = numbers(item.bbox_2d, 4), point = numbers(item.point_2d, 2);
    if (box) out.push(["box", label, ordered(box), pic]);
    else if (point) out.push(["point", label, point, pic]);
  }
  if (out.length) return out;
  let end = 0;
  for (const m of text.matchAll(TEXT_BOX)) {
    let label = m[1];
    if (label === undefined) {
      const start = Math.max(end, text.lastIndexOf("\n", m.index - 1) + 1);
      label = text.slice(start, m.index).trim().replace(/[:,]+$/, "").trim();
    }
    end = m.index + m[0].length;
    out.push(["box", label.trim(), ordered(m.slice(2, 6).map((g) => clamp(parseFloat(g)))), null]);
  }
  return out;
}

// The marks of text in pixels of pictures of sizes [[width, height], ...] (in the order given).
export function findMarks(text, sizes) {
  if (!sizes.length) return [];
  const marks = [];
  for (const [kind, label, coords, pic] of relativeMarks(text)) {
    const index = pic === null ? sizes.length - 1 : pic - 1;
    if (index >= sizes.length) continue;
    const [w, h] = sizes[index];
    const scaled = coords.map((c, k) => Math.round((c * (k % 2 === 0 ? w : h) / SCALE) * 100) / 100);
    marks.push({ kind, label, coords: scaled, picture: index });
  }
  return marks;
}
