// A stacked bar chart in plain SVG: one bar per day, one segment per series. Colours come from the
// stylesheet (classes s0..s7), so both themes apply; every segment has a <title> for hover and readers.

const NS = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

// A round axis maximum: 4 gridline steps of 1, 2, 2.5 or 5 times a power of ten (whole steps for counts).
export function niceMax(max, whole) {
  if (!(max > 0)) return 4;
  const raw = max / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) {
    const step = m * p;
    if (step >= raw && (!whole || Number.isInteger(step))) return 4 * step;
  }
  return 40 * p;
}

/**
 * Draw into `container` (emptied first).
 * days: ["2026-12-01", ...]; series: [{name, values: [number per day]}]; format: number -> axis/tooltip text.
 */
export function stackedBars(container, days, series, format, label, whole = false) {
  container.replaceChildren();
  // The drawing is as wide as its box, so text stays at its CSS size on a phone and on a laptop.
  const width = Math.max(300, Math.round(container.clientWidth || 760)), height = width < 500 ? 180 : 220;
  const left = 52, right = 8, top = 10, bottom = 26;
  const totals = days.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const max = niceMax(Math.max(0, ...totals), whole);
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label}, container);
  const plotH = height - top - bottom, plotW = width - left - right;
  for (let g = 0; g <= 4; g++) {
    const y = top + plotH - (plotH * g) / 4;
    el("line", {x1: left, x2: width - right, y1: y, y2: y, class: "grid"}, svg);
    el("text", {x: left - 6, y: y + 4, "text-anchor": "end"}, svg).textContent = format((max * g) / 4);
  }
  const slot = plotW / Math.max(1, days.length), barW = Math.max(4, slot * 0.62);
  const labelEvery = Math.max(1, Math.ceil(44 / slot));  // a date label needs about 44 px
  days.forEach((day, i) => {
    const x = left + slot * i + (slot - barW) / 2;
    let y = top + plotH;
    series.forEach((s, si) => {
      const v = s.values[i];
      if (!(v > 0)) return;
      const h = (plotH * v) / max;
      y -= h;
      const rect = el("rect", {x, y, width: barW, height: Math.max(h, 0.5), class: `s${si % 8}`}, svg);
      el("title", {}, rect).textContent = `${day} · ${s.name}: ${format(v)}`;
    });
    if ((days.length - 1 - i) % labelEvery === 0) {
      el("text", {x: left + slot * i + slot / 2, y: height - 8, "text-anchor": "middle"}, svg).textContent =
        day.slice(5);
    }
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, si) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = `s${si % 8}`;
    item.append(swatch, s.name);
    legend.appendChild(item);
  });
  if (!series.length) legend.textContent = "No usage in these 14 days yet.";
  container.appendChild(legend);
}
