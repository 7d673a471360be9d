"use strict";
// The Inspect view (GLTR): a text's tokens coloured by the rank the model gave each one, or by
// its surprisal in bits, with each token's details on hover or focus, a summary and a histogram
// of ranks. Used by the page `gpt2 serve` answers at / and by `gpt2 score --html`'s file, which
// inlines this script and its data (a JSON script element, id gltr-data).
//
// Data: {score, pieces, positions, settings}: `score` is what `gpt2 score --json --tokens
// --top 5` prints (POST /v1/score), `pieces` every token of the text as /tokenize's
// with_pieces gives it (a string, or a list of bytes when not UTF-8), `positions` the index of
// each scored token among them (absent: all scored, in order), `settings` the rank buckets'
// limits and GLTR's own colours, from gpt2cli.output (the one definition).
// Every piece of text goes into the page as text (textContent, append), never as HTML.
(function () {
  const BITS = [1, 2, 4, 8, 16]; // surprisal bins: < 1 bit, 1-2, ..., >= 16 bits
  const state = { by: "rank", classic: false };
  let serial = 0; // ids of the controls, unique however often a view is drawn

  // The text of each token's span, so that the spans in order spell the text exactly: a
  // character is given whole to the token holding its first byte; a token holding only the
  // rest of a character gets an empty span.
  function spanTexts(pieces) {
    const encoder = new TextEncoder();
    const parts = pieces.map((p) =>
      typeof p === "string" ? encoder.encode(p) : Uint8Array.from(p),
    );
    const all = new Uint8Array(parts.reduce((n, b) => n + b.length, 0));
    const starts = [];
    let offset = 0;
    for (const b of parts) {
      starts.push(offset);
      all.set(b, offset);
      offset += b.length;
    }
    const boundary = (x) => {
      while (x < all.length && (all[x] & 0xc0) === 0x80) x++; // skip continuation bytes
      return x;
    };
    const decoder = new TextDecoder();
    return parts.map((b, i) => {
      const start = boundary(starts[i]);
      const end = boundary(starts[i] + b.length);
      return start < end ? decoder.decode(all.subarray(start, end)) : "";
    });
  }

  function bucket(rank, limits) {
    const i = limits.findIndex((limit) => rank <= limit);
    return i < 0 ? limits.length : i;
  }

  function bitsBin(bits) {
    const i = BITS.findIndex((b) => bits < b);
    return i < 0 ? BITS.length : i;
  }

  const number = new Intl.NumberFormat("en");
  const significant = new Intl.NumberFormat("en", { maximumSignificantDigits: 4 });
  const visible = (text) =>
    text === "" ? "(empty)" : text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  const bits = (logprob) => -logprob / Math.LN2;
  const percent = (logprob) => {
    const p = 100 * Math.exp(logprob);
    return (p >= 10 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(2) : p.toExponential(1)) + "%";
  };

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attributes || {})) node.setAttribute(k, v);
    node.append(...children); // strings become text nodes
    return node;
  }

  function legend(settings) {
    const list = el("ul", { class: "legend", "aria-label": "Legend" });
    if (state.by === "rank") {
      const limits = settings.limits;
      limits.forEach((limit, i) =>
        list.append(
          el(
            "li",
            {},
            el("span", { class: "swatch", "data-bucket": i }),
            "top " + number.format(limit),
          ),
        ),
      );
      const last = number.format(limits[limits.length - 1]);
      list.append(
        el(
          "li",
          {},
          el("span", { class: "swatch", "data-bucket": limits.length }),
          "beyond " + last,
        ),
      );
    } else {
      const labels = ["< 1 bit", "1–2 bits", "2–4 bits", "4–8 bits", "8–16 bits", "≥ 16 bits"];
      labels.forEach((label, i) =>
        list.append(el("li", {}, el("span", { class: "swatch", "data-bits": i }), label)),
      );
    }
    return list;
  }

  // Histogram bins of ranks: 1, then each limit split in two halves, then two more decades
  function bins(limits) {
    const edges = [1];
    for (const limit of limits) edges.push(limit / 2, limit);
    const last = limits[limits.length - 1];
    edges.push(last * 5, last * 10, Infinity);
    return edges.map((high, i) => ({ low: i ? edges[i - 1] + 1 : 1, high }));
  }

  function histogram(ranks, limits) {
    const rows = bins(limits).map((b) => ({ ...b, count: 0 }));
    for (const rank of ranks) rows.find((r) => rank <= r.high).count++;
    const most = Math.max(1, ...rows.map((r) => r.count));
    const figure = el(
      "figure",
      { class: "histogram" },
      el("figcaption", {}, "Ranks of the tokens"),
    );
    for (const r of rows) {
      const label =
        r.high === Infinity
          ? "> " + number.format(r.low - 1)
          : r.low === r.high
            ? number.format(r.low)
            : number.format(r.low) + "–" + number.format(r.high);
      const bar = el("span", { class: "hbar", "data-bucket": bucket(r.high, limits) });
      bar.style.width = (100 * r.count) / most + "%"; // CSSOM: allowed by the page's CSP
      figure.append(
        el(
          "div",
          { class: "hrow" },
          el("span", { class: "hlabel" }, label),
          el("span", { class: "htrack" }, bar),
          el("span", { class: "hcount" }, number.format(r.count)),
        ),
      );
    }
    return figure;
  }

  function details(panel, span, token) {
    panel.replaceChildren();
    panel.append(
      el("p", { class: "dtoken" }, el("span", { class: "tok-text" }, visible(span.textContent))),
    );
    if (token === undefined) {
      panel.append(el("p", {}, "Not scored: this token has no context before it."));
      return;
    }
    if (span.textContent === "") {
      panel.append(
        el(
          "p",
          { class: "muted" },
          "It holds the rest of a character that the token before it shows.",
        ),
      );
    }
    panel.append(
      el(
        "p",
        {},
        "rank " +
          number.format(token.rank) +
          " · logprob " +
          token.logprob.toFixed(4) +
          " · " +
          bits(token.logprob).toFixed(2) +
          " bits · p " +
          percent(token.logprob),
      ),
    );
    const top = token.top || [];
    if (!top.length) return;
    const table = el(
      "table",
      { class: "alternatives" },
      el("caption", {}, "The model's top " + top.length),
    );
    for (const alt of top) {
      const bar = el("span", { class: "pbar" });
      bar.style.width = 100 * Math.exp(alt.logprob) + "%";
      const row = el(
        "tr",
        {},
        el("td", { class: "tok-text" }, visible(alt.text)),
        el("td", { class: "num" }, percent(alt.logprob)),
        el("td", { class: "ptrack" }, bar),
      );
      if (alt.id === token.id) row.classList.add("chosen");
      table.append(row);
    }
    panel.append(table);
  }

  function render(container, data) {
    const { score, settings } = data;
    const limits = settings.limits;
    settings.classic.forEach((colour, i) => container.style.setProperty("--classic-" + i, colour));
    const positions = data.positions || score.tokens.map((_, i) => i);
    const scored = new Map(positions.map((p, k) => [p, score.tokens[k]]));
    const texts = spanTexts(data.pieces);
    const id = "gltr" + ++serial;

    const by = el("fieldset", { class: "by" }, el("legend", {}, "Colour by"));
    for (const [value, label] of [
      ["rank", "rank (GLTR)"],
      ["bits", "surprisal (bits)"],
    ]) {
      const radio = el("input", { type: "radio", name: id + "-by", id: id + "-" + value, value });
      radio.checked = state.by === value;
      by.append(radio, el("label", { for: id + "-" + value }, label));
    }
    const classic = el("input", { type: "checkbox", id: id + "-classic" });
    classic.checked = state.classic;
    const palette = el(
      "span",
      { class: "palette" },
      classic,
      el("label", { for: id + "-classic" }, "GLTR's original colours (not colour-blind safe)"),
    );
    const tokens = el("div", {
      id: "tokens",
      class: "tokens",
      role: "group",
      "aria-label": "Tokens: tab or arrow keys to move",
    });
    const panel = el(
      "aside",
      { id: "details", class: "details", "aria-live": "polite" },
      el(
        "p",
        { class: "muted" },
        "Hover over or focus a token to see its rank, logprob and the model's top alternatives.",
      ),
    );
    let key = legend(settings);
    const view = el("div", { class: "gltr" });
    const apply = () => {
      view.className = "gltr by-" + state.by + (state.classic ? " classic" : "");
      palette.hidden = state.by !== "rank";
    };
    by.addEventListener("change", (e) => {
      state.by = e.target.value;
      const fresh = legend(settings);
      key.replaceWith(fresh);
      key = fresh;
      apply();
    });
    classic.addEventListener("change", () => {
      state.classic = classic.checked;
      apply();
    });

    const fragment = document.createDocumentFragment();
    texts.forEach((text, i) => {
      const span = el("span", { class: "tok", tabindex: "0", "data-i": i }, text);
      const token = scored.get(i);
      if (token !== undefined) {
        span.dataset.rank = token.rank;
        span.dataset.logprob = token.logprob;
        span.dataset.bucket = bucket(token.rank, limits);
        span.dataset.bits = bitsBin(bits(token.logprob));
      }
      fragment.append(span);
    });
    tokens.append(fragment);
    const show = (e) => {
      const span = e.target.closest(".tok");
      if (span) details(panel, span, scored.get(Number(span.dataset.i)));
    };
    tokens.addEventListener("mouseover", show);
    tokens.addEventListener("focusin", show);
    tokens.addEventListener("keydown", (e) => {
      const moves = { ArrowRight: "nextElementSibling", ArrowLeft: "previousElementSibling" };
      let next = moves[e.key] ? e.target[moves[e.key]] : null;
      if (e.key === "Home") next = tokens.firstElementChild;
      if (e.key === "End") next = tokens.lastElementChild;
      if (next) {
        e.preventDefault();
        next.focus();
      }
    });

    const fmt = (x) => (x === null ? "—" : x < 1e6 ? significant.format(x) : x.toExponential(3));
    const summary = el(
      "p",
      { id: "summary", class: "summary" },
      el("strong", {}, number.format(score.n_tokens)),
      " tokens scored · perplexity ",
      el("strong", {}, fmt(score.perplexity)),
      " · ",
      el("strong", {}, score.bits_per_byte === null ? "—" : score.bits_per_byte.toFixed(4)),
      " bits per byte",
    );
    view.append(
      el("div", { class: "controls" }, by, palette),
      key,
      summary,
      el("div", { class: "layout" }, tokens, panel),
      histogram(
        score.tokens.map((t) => t.rank),
        limits,
      ),
    );
    apply();
    container.replaceChildren(view);
  }

  window.GLTR = { render, spanTexts };

  document.addEventListener("DOMContentLoaded", () => {
    const data = document.getElementById("gltr-data"); // gpt2 score --html's file
    if (data) render(document.getElementById("inspect-result"), JSON.parse(data.textContent));
  });
})();
