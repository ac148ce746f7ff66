// Inline SVG line charts for the dashboard: no library, no build step.
// lineChart(svg, series, options) redraws `svg` from scratch.
//   series:  [{name, points: [[t_seconds, value], ...], color, dashed}]
//   options: {unit, threshold, thresholdLabel, minY}
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmtTime(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

function fmtNum(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 1) return v.toFixed(1);
  return v.toPrecision(2);
}

function lineChart(svg, series, options) {
  const opts = options || {};
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 600, H = 240, L = 48, R = 12, T = 12, B = 40;
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) {
    svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted"},
                          "no data yet"));
    svg.dataset.points = "0";
    return;
  }
  let t0 = Math.min(...pts.map((p) => p[0]));
  let t1 = Math.max(...pts.map((p) => p[0]));
  if (t1 - t0 < 1) { t0 -= 30; t1 += 30; }
  let yMax = Math.max(...pts.map((p) => p[1]), opts.threshold || 0, opts.minY || 0);
  yMax = yMax > 0 ? yMax * 1.1 : 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / yMax) * (H - T - B);

  const axes = svgEl("g", {class: "axes"});
  axes.appendChild(svgEl("line", {x1: L, y1: y(0), x2: W - R, y2: y(0)}));
  axes.appendChild(svgEl("line", {x1: L, y1: T, x2: L, y2: y(0)}));
  for (let i = 0; i <= 4; i++) {
    const v = (yMax / 4) * i;
    axes.appendChild(svgEl("line", {x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid"}));
    axes.appendChild(svgEl("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, fmtNum(v)));
  }
  axes.appendChild(svgEl("text", {x: L, y: H - B + 16, "text-anchor": "start"}, fmtTime(t0)));
  axes.appendChild(svgEl("text", {x: W - R, y: H - B + 16, "text-anchor": "end"}, fmtTime(t1)));
  if (opts.unit) {
    axes.appendChild(svgEl("text", {x: 4, y: T + 4, "text-anchor": "start"}, opts.unit));
  }
  svg.appendChild(axes);

  if (opts.threshold !== undefined) {
    svg.appendChild(svgEl("line", {x1: L, y1: y(opts.threshold), x2: W - R,
                                   y2: y(opts.threshold), class: "threshold"}));
    svg.appendChild(svgEl("text", {x: W - R - 4, y: y(opts.threshold) - 4, "text-anchor": "end",
                                   class: "threshold-label"},
                          opts.thresholdLabel || "threshold"));
  }

  const legend = svgEl("g", {class: "legend"});
  let lx = L;
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const sorted = s.points.slice().sort((a, b) => a[0] - b[0]);
    const d = sorted.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`)
      .join(" ");
    const path = svgEl("path", {d, class: "series", stroke: color, fill: "none"});
    if (s.dashed) path.setAttribute("stroke-dasharray", "5 4");
    path.appendChild(svgEl("title", {}, s.name));
    svg.appendChild(path);
    for (const p of sorted.length === 1 ? sorted : []) {
      svg.appendChild(svgEl("circle", {cx: x(p[0]), cy: y(p[1]), r: 3, fill: color}));
    }
    if (!s.dashed) {
      legend.appendChild(svgEl("rect", {x: lx, y: H - 14, width: 10, height: 10, fill: color}));
      const label = svgEl("text", {x: lx + 14, y: H - 5}, s.name);
      legend.appendChild(label);
      lx += 22 + 7 * s.name.length;
    }
  });
  svg.appendChild(legend);
  svg.dataset.points = String(pts.length);
}

window.edgefleetCharts = {lineChart, PALETTE};
