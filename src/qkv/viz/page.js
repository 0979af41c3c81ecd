// qkv attention viewer: head view, model view and the step-by-step panel of the map
// embedded in `root` (its .qkv-data script). Plain DOM and SVG/canvas; nothing is fetched.
// Everything is looked up inside `root` (classes, no ids), so several viewers (two maps
// in one notebook) work side by side.
function qkvViewer(root) {
  "use strict";
  const D = JSON.parse(root.querySelector(".qkv-data").textContent);
  const [NL, NH, LQ, LK] = D.shape;

  function f32(b64) {  // little-endian float32 array from base64
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  const W = f32(D.weights);                      // (NL, NH, LQ, LK)
  const Q = D.q ? f32(D.q) : null;               // (NL, NH, LQ, DQ)
  const K = D.k ? f32(D.k) : null;               // (NL, NH, LK, DQ)
  const V = D.v ? f32(D.v) : null;               // (NL, NH, LK, DV)
  const DQ = D.q_dim, DV = D.v_dim;
  const KEYS = D.key_tokens || D.tokens;
  const QSPECIAL = D.special || D.tokens.map(() => false);
  const KSPECIAL = D.key_special || (D.key_tokens ? KEYS.map(() => false) : QSPECIAL);
  const KWORDS = D.key_tokens ? D.key_words : D.words;
  const KSPANS = D.key_tokens ? D.key_word_spans : D.word_spans;

  // ---- colours: the square-root ramp shared with the terminal and PNG views ------------
  const RAMP = [[0x2b, 0x1a, 0x4a], [0x3b, 0x4f, 0x8c], [0x23, 0x8a, 0x8d], [0x4c, 0xc2, 0x6c],
                [0xf6, 0xe6, 0x20]];
  function colour(w) {
    const x = Math.sqrt(Math.min(Math.max(w, 0), 1)) * (RAMP.length - 1);
    const i = Math.min(Math.floor(x), RAMP.length - 2), t = x - i;
    return RAMP[i].map((a, c) => Math.round(a + (RAMP[i + 1][c] - a) * t));
  }
  const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;

  // ---- views: merge subwords into words, hide special tokens ----------------------------
  // A unit is a list of base token indices. Merging: rows average over a word's pieces,
  // columns sum over them; hiding: special units removed, rows renormalised (as in
  // AttentionMap.merge_words / drop_special).
  function units(n, labels, words, spans, merge) {
    const out = [];
    const starts = new Map();
    if (merge && spans) spans.forEach((s, w) => starts.set(s[0], [s[1], words[w]]));
    for (let i = 0; i < n;) {
      if (starts.has(i)) {
        const [end, word] = starts.get(i);
        const g = [];
        for (let t = i; t < end; t++) g.push(t);
        out.push({ tokens: g, label: word });
        i = end;
      } else { out.push({ tokens: [i], label: labels[i] }); i++; }
    }
    return out;
  }
  const cache = new Map();
  function view(merge, hide) {
    const key = `${merge}|${hide}`;
    if (cache.has(key)) return cache.get(key);
    let qu = units(LQ, D.tokens, D.words, D.word_spans, merge);
    let ku = D.key_tokens ? units(LK, KEYS, KWORDS, KSPANS, merge) : qu;
    qu = qu.map((u) => ({ ...u, special: u.tokens.every((t) => QSPECIAL[t]) }));
    ku = ku.map((u) => ({ ...u, special: u.tokens.every((t) => KSPECIAL[t]) }));
    if (hide) {
      const q2 = qu.filter((u) => !u.special), k2 = ku.filter((u) => !u.special);
      if (q2.length && k2.length) { qu = q2; ku = k2; }
    }
    const heads = new Map();
    const v = {
      rows: qu, cols: ku,
      head(l, h) {  // Float32Array (rows x cols) of the view, cached
        const id = l * NH + h;
        if (heads.has(id)) return heads.get(id);
        const m = new Float32Array(qu.length * ku.length);
        const base = id * LQ * LK;
        qu.forEach((u, r) => {
          ku.forEach((c, col) => {
            let s = 0;
            for (const i of u.tokens) for (const j of c.tokens) s += W[base + i * LK + j];
            m[r * ku.length + col] = s / u.tokens.length;
          });
          if (hide) {
            let tot = 0;
            for (let col = 0; col < ku.length; col++) tot += m[r * ku.length + col];
            for (let col = 0; col < ku.length; col++) m[r * ku.length + col] = tot > 0 ? m[r * ku.length + col] / tot : 0;
          }
        });
        heads.set(id, m);
        return m;
      },
    };
    cache.set(key, v);
    return v;
  }

  // ---- state ---------------------------------------------------------------------------
  const S = {
    layer: Math.min(D.initial.layer, NL - 1), head: Math.min(D.initial.head, NH - 1),
    merge: !!D.initial.words && !!(D.word_spans || D.key_word_spans),
    hide: !!D.initial.hide_special,
    pinned: D.initial.query,  // a base token index (query side): the step-by-step query
    locked: false,            // clicked: the head view keeps showing the pinned token
    hover: null,              // {side: "q"|"k", unit}
  };
  const $ = (name) => root.querySelector(".qkv-" + name);
  // "layer 3" for a numeric label, the label itself otherwise ("decoder 0")
  const layerName = (l) => (/^\d+$/.test(D.layer_labels[l]) ? "layer " : "") + D.layer_labels[l];
  const headName = (h) => (/^\d+$/.test(D.head_labels[h]) ? "head " : "") + D.head_labels[h];
  const el = (tag, attrs, text) => {
    const svgTags = ["svg", "line", "text", "rect", "g"];
    const e = svgTags.includes(tag) ? document.createElementNS("http://www.w3.org/2000/svg", tag)
      : document.createElement(tag);
    for (const [k, val] of Object.entries(attrs || {})) e.setAttribute(k, val);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const unitOf = (units, token) => units.findIndex((u) => u.tokens.includes(token));

  // ---- header and controls -------------------------------------------------------------
  $("title").textContent = (D.model ? D.model + ": " : "") +
    (D.kind === "rollout" ? "attention rollout" : "attention");
  $("subtitle").textContent = D.title || "";
  D.layer_labels.forEach((lab, i) => $("layer").append(el("option", { value: i }, lab)));
  D.head_labels.forEach((lab, i) => $("head").append(el("option", { value: i }, lab)));
  if (!(D.word_spans || D.key_word_spans)) $("words-box").hidden = true;
  if (!(D.special || D.key_special)) $("special-box").hidden = true;
  $("ramp").style.background = "linear-gradient(to right," +
    [0, 0.05, 0.15, 0.3, 0.5, 0.75, 1].map((w) => rgb(colour(w))).join(",") + ")";
  $("layer").onchange = (e) => { S.layer = +e.target.value; render(); };
  $("head").onchange = (e) => { S.head = +e.target.value; render(); };
  $("words").onchange = (e) => { S.merge = e.target.checked; S.hover = null; render(); };
  $("hide").onchange = (e) => { S.hide = e.target.checked; S.hover = null; render(); };

  // ---- head view: two columns of tokens joined by lines --------------------------------
  // build() makes the SVG when the view, layer or head changes; paint() only restyles it
  // when the focus (hover) changes, so the element under the pointer is never replaced.
  const ROW = 22, LEFT = 130, GAP = 190;
  let H = null;  // {m, nc, lines, qtok, ktok, qpct, kpct}
  function headView(v) {
    const m = v.head(S.layer, S.head);
    const nr = v.rows.length, nc = v.cols.length;
    const height = Math.max(nr, nc) * ROW + 30;
    const svg = el("svg", { width: LEFT * 2 + GAP + 40, height, class: "qkv-headsvg" });
    svg.append(el("text", { x: LEFT - 6, y: 10, "text-anchor": "end", class: "col-label" },
                  "attending (queries)"));
    svg.append(el("text", { x: LEFT + GAP + 6, y: 10, class: "col-label" },
                  D.key_tokens ? "attended to (keys)" : "attended to (keys: the same tokens)"));
    const yq = (i) => 30 + i * ROW, yk = (j) => 30 + j * ROW;
    const g = el("g", { class: "qkv-lines" });
    const lines = [];
    for (let i = 0; i < nr; i++) {
      for (let j = 0; j < nc; j++) {
        const w = m[i * nc + j];
        if (w < 1e-4) continue;  // invisible at any focus
        const ln = el("line", { x1: LEFT, y1: yq(i), x2: LEFT + GAP, y2: yk(j), stroke: "#2563eb" });
        lines.push({ ln, i, j, w });
        g.append(ln);
      }
    }
    svg.append(g);
    const pinnedUnit = unitOf(v.rows, S.pinned);
    const addTok = (side, idx, u, x, y, anchor) => {
      const grp = el("g", { class: "tokg", "data-side": side, "data-unit": idx });
      const width = u.label.length * 7.6 + 10;
      const bg = el("rect", { class: "tok-bg", x: anchor === "end" ? x - width + 2 : x - 2,
        y: y - ROW / 2 + 2, width, height: ROW - 4 });
      const cls = "tok" + (u.special ? " special" : "") + (side === "q" && idx === pinnedUnit ? " pinned" : "");
      const t = el("text", { x: anchor === "end" ? x - 4 : x + 2, y, "text-anchor": anchor, class: cls,
        "data-side": side, "data-unit": idx }, u.label);
      grp.append(bg, t);
      grp.addEventListener("mouseenter", () => { S.hover = { side, unit: idx }; focusChanged(); });
      grp.addEventListener("mouseleave", () => { S.hover = null; focusChanged(); });
      if (side === "q") grp.addEventListener("click", () => pin(idx));
      svg.append(grp);
      return { bg, t };
    };
    const qtok = v.rows.map((u, i) => addTok("q", i, u, LEFT, yq(i), "end"));
    const ktok = v.cols.map((u, j) => addTok("k", j, u, LEFT + GAP, yk(j), "start"));
    const qpct = v.rows.map((_, i) => { const t = el("text", { x: 4, y: yq(i), class: "pct" }); svg.append(t); return t; });
    const kpct = v.cols.map((_, j) => {
      const t = el("text", { x: LEFT * 2 + GAP + 36, y: yk(j), "text-anchor": "end", class: "pct" });
      svg.append(t); return t;
    });
    $("headview").replaceChildren(svg);
    H = { m, nc, lines, qtok, ktok, qpct, kpct, rows: v.rows };
    paint();
  }
  // Click a query token: it stays in focus after the pointer leaves (and drives the step
  // panel); click it again to let go.
  function pin(unit) {
    const u = H.rows[unit];
    if (S.locked && unitOf(H.rows, S.pinned) === unit) S.locked = false;
    else { S.pinned = u.tokens[0]; S.locked = true; }
    const p = unitOf(H.rows, S.pinned);
    H.qtok.forEach((tok, i) => tok.t.classList.toggle("pinned", i === p));
    focusChanged();
  }
  function focus() {
    if (S.hover) return S.hover;
    const p = S.locked ? unitOf(H.rows, S.pinned) : -1;
    return p >= 0 ? { side: "q", unit: p } : null;
  }
  function paint() {
    const f = focus(), { m, nc } = H;
    for (const { ln, i, j, w } of H.lines) {
      let op = Math.sqrt(w) * 0.55, width = 1.5;
      if (f) {
        const on = f.side === "q" ? f.unit === i : f.unit === j;
        op = on ? Math.min(1, Math.sqrt(w) * 1.1) : 0;
        width = 1 + 3 * w;
      }
      ln.setAttribute("stroke-opacity", op.toFixed(3));
      ln.setAttribute("stroke-width", width.toFixed(2));
    }
    const shade = (tok, pct, w) => {
      tok.bg.style.fill = w === null ? "transparent" : rgb(colour(w));
      tok.t.style.fill = w === null ? "" : (w > 0.3 ? "#000" : "#fff");
      pct.textContent = w === null ? "" : fmtPct(w);
    };
    H.qtok.forEach((tok, i) => shade(tok, H.qpct[i], f && f.side === "k" ? m[i * nc + f.unit] : null));
    H.ktok.forEach((tok, j) => shade(tok, H.kpct[j], f && f.side === "q" ? m[f.unit * nc + j] : null));
    $("headview").dataset.focus = f ? `${f.side}${f.unit}` : "";
    $("headview").dataset.pinned = S.locked ? String(unitOf(H.rows, S.pinned)) : "";
  }
  function focusChanged() { paint(); steps(view(S.merge, S.hide)); }
  const fmtPct = (w) => (100 * w).toFixed(w >= 0.1 ? 0 : 1) + "%";

  // ---- model view: every layer x head as a small heatmap -------------------------------
  function modelView(v) {
    const box = $("modelview");
    const nr = v.rows.length, nc = v.cols.length;
    const px = Math.max(1, Math.min(24, Math.floor(84 / Math.max(nr, nc))));  // ~84 px tiles
    box.style.gridTemplateColumns = `auto repeat(${NH}, auto)`;
    const kids = [el("span", { class: "lbl" }, "")];
    D.head_labels.forEach((_, h) => kids.push(el("span", { class: "lbl" }, headName(h))));
    for (let l = 0; l < NL; l++) {
      kids.push(el("span", { class: "lbl" }, layerName(l)));
      for (let h = 0; h < NH; h++) {
        const c = el("canvas", { width: nc * px, height: nr * px, "data-layer": l, "data-head": h,
          title: `${layerName(l)}, ${headName(h)}` });
        if (l === S.layer && h === S.head) c.classList.add("current");
        const ctx = c.getContext("2d");
        const m = v.head(l, h);
        const img = ctx.createImageData(nc * px, nr * px);
        for (let y = 0; y < nr * px; y++) {
          for (let x = 0; x < nc * px; x++) {
            const col = colour(m[Math.floor(y / px) * nc + Math.floor(x / px)]);
            const o = (y * nc * px + x) * 4;
            img.data[o] = col[0]; img.data[o + 1] = col[1]; img.data[o + 2] = col[2]; img.data[o + 3] = 255;
          }
        }
        ctx.putImageData(img, 0, 0);
        c.addEventListener("click", () => {
          S.layer = l; S.head = h; render();
          // the head view is above the grid: bring it into sight to show the chosen head
          const r = $("head-section").getBoundingClientRect();
          if (r.top < 0 || r.bottom > window.innerHeight) $("head-section").scrollIntoView({ block: "start" });
        });
        kids.push(c);
      }
    }
    box.replaceChildren(...kids);
  }

  // ---- the step-by-step panel: q.k, scaled, softmax, weighted sum ----------------------
  const fmt = (x) => (x === -Infinity ? "−∞" : Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 1e-3)
    ? x.toExponential(2) : x.toFixed(4));
  function steps(v) {
    const sec = $("steps");
    if (!(Q && K && V) || D.kind !== "attention") { sec.hidden = true; return; }
    sec.hidden = false;
    let token = S.pinned, note = "";
    if (S.hover && S.hover.side === "q") token = v.rows[S.hover.unit].tokens[0];
    const unit = v.rows[unitOf(v.rows, token)];
    if (unit && unit.tokens.length > 1) {
      note = ` The word “${unit.label}” has ${unit.tokens.length} tokens; this is its first, “${D.tokens[token]}”.`;
    }
    const l = S.layer, h = S.head, base = l * NH + h;
    const q = Q.subarray((base * LQ + token) * DQ, (base * LQ + token + 1) * DQ);
    const scores = [], scaled = [], allowed = [];
    for (let j = 0; j < LK; j++) {
      const k = K.subarray((base * LK + j) * DQ, (base * LK + j + 1) * DQ);
      let s = 0;
      for (let d = 0; d < DQ; d++) s += q[d] * k[d];
      scores.push(s);
      scaled.push(s * D.scale);
      allowed.push(D.allowed ? D.allowed[token][j] : true);
    }
    const mx = Math.max(...scaled.filter((_, j) => allowed[j]));
    const ex = scaled.map((s, j) => (allowed[j] ? Math.exp(s - mx) : 0));
    const tot = ex.reduce((a, b) => a + b, 0);
    const soft = ex.map((e) => (tot > 0 ? e / tot : 0));
    const out = new Float64Array(DV);
    for (let j = 0; j < LK; j++) {
      for (let d = 0; d < DV; d++) out[d] += soft[j] * V[(base * LK + j) * DV + d];
    }
    let diff = 0;
    for (let j = 0; j < LK; j++) diff = Math.max(diff, Math.abs(soft[j] - W[(base * LQ + token) * LK + j]));
    const best = soft.indexOf(Math.max(...soft));
    const body = $("steps-body");
    body.replaceChildren();
    const p1 = el("p");
    p1.append(`Query “${D.tokens[token]}” (token ${token}) in ${layerName(l)}, ${headName(h)}: ` +
      `d = ${DQ}, scale = 1/√${DQ} = ${D.scale.toFixed(5)}.${note}`);
    body.append(p1);
    const tbl = el("table", { class: "qkv-steps-table" });
    const hdr = el("tr");
    ["key", "1. q·k", "2. × scale", "3. softmax", ""].forEach((t) => hdr.append(el("th", {}, t)));
    tbl.append(hdr);
    for (let j = 0; j < LK; j++) {
      const tr = el("tr", { class: j === best ? "top" : "" });
      tr.append(el("td", {}, KEYS[j]));
      tr.append(el("td", {}, fmt(scores[j])));
      tr.append(el("td", {}, allowed[j] ? fmt(scaled[j]) : "−∞ (hidden)"));
      tr.append(el("td", { class: "w", "data-j": j }, soft[j].toFixed(4)));
      const bar = el("td", { class: "bar" });
      const span = el("span");
      span.style.width = (90 * soft[j]).toFixed(1) + "px";
      bar.append(span);
      tr.append(bar);
      tbl.append(tr);
    }
    body.append(tbl);
    const p2 = el("p");
    p2.append(`4. output = Σ softmax_j · v_j, the ${DV} numbers this head passes on (before W_o):`);
    body.append(p2);
    body.append(el("div", { class: "vec qkv-steps-output" }, "[" + Array.from(out, (x) => x.toFixed(3)).join(", ") + "]"));
    const p3 = el("p", { class: "ok qkv-steps-check" },
      `This softmax matches the weights the model used to within ${diff.toExponential(1)}.`);
    body.append(p3);
  }

  function render() {
    const v = view(S.merge, S.hide);
    $("layer").value = S.layer; $("head").value = S.head;
    $("words").checked = S.merge; $("hide").checked = S.hide;
    headView(v);
    modelView(v);
    steps(v);
  }
  if (D.note) { $("note").textContent = D.note; $("note").hidden = false; }
  $("noscript").hidden = true;
  render();
  root.qkvViewer = { state: S, view: () => view(S.merge, S.hide), render };
}
