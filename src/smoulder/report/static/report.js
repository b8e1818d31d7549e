// smoulder report: lazy lesion images, filters, keyboard review, TSV export/import, saving.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const images = JSON.parse(document.getElementById("lesion-images").textContent);
  const rimBox = document.getElementById("rim-images");
  const rimImages = rimBox ? JSON.parse(rimBox.textContent) : {};
  const gridBox = document.getElementById("grid-images");
  const gridImages = gridBox ? JSON.parse(gridBox.textContent) : {}; // tracked lesions, every session
  const COLUMNS = ["lesion_id", "rater", "lesion", "rim", "sel", "note", "time"];
  const FIELDS = ["lesion", "rim", "sel", "note"];
  const served = location.protocol === "http:" || location.protocol === "https:";
  const storeKey = "smoulder-review-" + data.subject;
  const cardsBox = document.getElementById("cards");
  const cards = Array.from(document.querySelectorAll(".card"));
  const raterInput = document.getElementById("rater");
  const statusBox = document.getElementById("status");
  let rows = {}; // "id|rater" -> row, every rater
  let current = 0;

  function key(id, rater) { return id + "|" + rater; }
  function rater() { return raterInput.value.trim(); }
  function say(text) { statusBox.textContent = text; }
  function addRows(list) { list.forEach(function (r) { rows[key(r.lesion_id, r.rater)] = r; }); }

  addRows(data.review || []);
  try { addRows(JSON.parse(localStorage.getItem(storeKey) || "[]")); } catch (e) { /* file:// may forbid storage */ }
  try { raterInput.value = localStorage.getItem("smoulder-rater") || ""; } catch (e) { /* ignore */ }

  // ---- images: loaded when a card comes into view
  function showImages(card) {
    const id = card.dataset.lesionId;
    const lined = document.getElementById("contours").checked;
    card.querySelectorAll("img[data-modality]").forEach(function (img) {
      const info = (images[id] || {})[img.dataset.modality];
      if (info) { img.src = lined ? info.contour : info.gray; }
    });
    card.querySelectorAll("img[data-rim-crop]").forEach(function (img) {
      const info = rimImages[id];
      if (info) { img.src = lined ? info.contour : info.gray; }
    });
    card.querySelectorAll("img[data-grid]").forEach(function (img) {
      const info = (gridImages[id] || {})[img.dataset.grid];
      if (info) { img.src = lined ? info.contour : info.gray; }
    });
    card.dataset.loaded = "1";
  }
  const observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (e) { if (e.isIntersecting) { showImages(e.target); observer.unobserve(e.target); } });
  }, { rootMargin: "400px" }) : null;
  cards.forEach(function (c) { if (observer) { observer.observe(c); } else { showImages(c); } });

  // ---- decisions
  function rowOf(card) {
    const id = card.dataset.lesionId;
    const row = { lesion_id: id, rater: rater(), lesion: "", rim: "", sel: "", note: "", time: "" };
    ["lesion", "rim", "sel"].forEach(function (f) {
      const checked = card.querySelector("input[name='" + f + "-" + id + "']:checked");
      row[f] = checked ? checked.value : "";
    });
    row.note = card.querySelector("input.note").value;
    return row;
  }
  function fill(card) {
    const id = card.dataset.lesionId;
    const row = rows[key(id, rater())] || {};
    ["lesion", "rim", "sel"].forEach(function (f) {
      card.querySelectorAll("input[name='" + f + "-" + id + "']").forEach(function (i) { i.checked = row[f] === i.value; });
    });
    card.querySelector("input.note").value = row.note || "";
    mark(card);
  }
  function mark(card) {
    const row = rows[key(card.dataset.lesionId, rater())];
    card.classList.toggle("rated", !!(row && (row.lesion || row.rim || row.sel || row.note)));
  }
  function save(card) {
    if (!rater()) { say("Enter your rater ID first: nothing was saved."); raterInput.focus(); return; }
    const row = rowOf(card);
    row.time = new Date().toISOString().replace(/\.\d+Z$/, "+00:00");
    rows[key(row.lesion_id, row.rater)] = row;
    mark(card);
    try { localStorage.setItem(storeKey, JSON.stringify(Object.values(rows))); } catch (e) { /* ignore */ }
    if (served) {
      fetch("/api/review/" + encodeURIComponent(data.subject), {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ rows: [row] })
      }).then(function (r) { say(r.ok ? "saved lesion " + row.lesion_id : "not saved: HTTP " + r.status); })
        .catch(function (e) { say("not saved: " + e); });
    } else {
      say("lesion " + row.lesion_id + " noted (export the TSV to keep it)");
    }
  }
  cards.forEach(function (card) {
    card.addEventListener("change", function () { save(card); });
    card.addEventListener("focus", function () { current = visible().indexOf(card); });
    fill(card);
  });
  raterInput.addEventListener("change", function () {
    try { localStorage.setItem("smoulder-rater", rater()); } catch (e) { /* ignore */ }
    cards.forEach(fill);
  });

  // ---- TSV
  function clean(v) { return String(v == null ? "" : v).replace(/[\t\r\n]+/g, " ").trim(); }
  function tsv() {
    const list = Object.values(rows).filter(function (r) { return r.lesion || r.rim || r.sel || r.note; });
    list.sort(function (a, b) { return (a.lesion_id - b.lesion_id) || (a.rater < b.rater ? -1 : a.rater > b.rater ? 1 : 0); });
    return [COLUMNS.join("\t")].concat(list.map(function (r) {
      return COLUMNS.map(function (c) { return clean(r[c]); }).join("\t");
    })).join("\n") + "\n";
  }
  function parse(text) {
    const lines = text.split(/\r?\n/).filter(function (l) { return l.length; });
    const head = lines.shift().split("\t");
    if (head.indexOf("lesion_id") < 0 || head.indexOf("rater") < 0) { throw new Error("not a review table"); }
    return lines.map(function (l) {
      const cells = l.split("\t"); const r = {};
      head.forEach(function (h, i) { r[h] = cells[i] === "n/a" ? "" : (cells[i] || ""); });
      return r;
    });
  }
  document.getElementById("export").addEventListener("click", function () {
    const blob = new Blob([tsv()], { type: "text/tab-separated-values" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = data.subject + "_desc-review_lesions.tsv";
    document.body.appendChild(a); a.click(); a.remove();
    say("exported " + a.download);
  });
  document.getElementById("import").addEventListener("change", function (ev) {
    const file = ev.target.files[0]; if (!file) { return; }
    file.text().then(function (text) {
      try { const list = parse(text); addRows(list); cards.forEach(fill); say("imported " + list.length + " rows"); }
      catch (e) { say("import failed: " + e.message); }
    });
  });

  // ---- filters, sorting, keyboard
  function rated(card, field, values) {
    const r = rows[key(card.dataset.lesionId, rater())];
    return !!(r && values.indexOf(r[field]) >= 0);
  }
  function applyView() {
    const f = document.getElementById("filter").value;
    const s = document.getElementById("sort").value;
    cards.forEach(function (c) {
      let show = true;
      if (f === "unrated") { show = !c.classList.contains("rated"); }
      // rim candidates: called "yes" by the rim model, or rated definite/probable by the rater
      if (f === "rim") { show = c.dataset.rimCall === "yes" || rated(c, "rim", ["definite", "probable"]); }
      if (f === "sel") { show = rated(c, "sel", ["yes"]); }
      // tracked lesions: a fate at a later session, or the pipeline's SEL call
      if (f.indexOf("fate-") === 0) { show = (c.dataset.fates || "").split(" ").indexOf(f.slice(5)) >= 0; }
      if (f === "sel-call") { show = c.dataset.selCall === "yes"; }
      c.classList.toggle("hidden", !show);
    });
    const num = function (c, k) { const v = parseFloat(c.dataset[k]); return isNaN(v) ? -1 : v; };
    const order = cards.slice().sort(function (a, b) {
      if (s === "probability") { return num(b, "probability") - num(a, "probability"); }
      if (s === "rim") { return (num(b, "rimProbability") - num(a, "rimProbability")) || (a.dataset.lesionId - b.dataset.lesionId); }
      if (s === "volume") { return num(b, "volume") - num(a, "volume"); }
      if (s === "sel-rate") { return (num(b, "selRate") - num(a, "selRate")) || (a.dataset.lesionId - b.dataset.lesionId); }
      return a.dataset.lesionId - b.dataset.lesionId;
    });
    order.forEach(function (c) { cardsBox.appendChild(c); });
  }
  document.getElementById("filter").addEventListener("change", applyView);
  document.getElementById("sort").addEventListener("change", applyView);
  document.getElementById("contours").addEventListener("change", function () {
    cards.forEach(function (c) { if (c.dataset.loaded) { showImages(c); } });
  });
  function visible() { return Array.from(cardsBox.querySelectorAll(".card:not(.hidden)")); }
  function go(step) {
    const list = visible(); if (!list.length) { return; }
    current = Math.max(0, Math.min(list.length - 1, current + step));
    list.forEach(function (c) { c.classList.remove("current"); });
    list[current].classList.add("current"); list[current].focus(); list[current].scrollIntoView({ block: "nearest" });
  }
  function pick(card, field, value) {
    const input = card.querySelector("input[name='" + field + "-" + card.dataset.lesionId + "'][value='" + value + "']");
    if (input) { input.checked = true; save(card); }
  }
  document.addEventListener("keydown", function (ev) {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" && (t.type === "text" || t.classList.contains("note") || t.id === "rater") || t.tagName === "SELECT")) { return; }
    const card = visible()[current];
    const k = ev.key;
    if (k === "j") { go(1); } else if (k === "k") { go(-1); }
    else if (k === "c") { const box = document.getElementById("contours"); box.checked = !box.checked; box.dispatchEvent(new Event("change")); }
    else if (!card) { return; }
    else if (k === "y") { pick(card, "lesion", "yes"); } else if (k === "n") { pick(card, "lesion", "no"); }
    else if (k === "1") { pick(card, "rim", "definite"); } else if (k === "2") { pick(card, "rim", "probable"); }
    else if (k === "3") { pick(card, "rim", "none"); } else if (k === "s") { pick(card, "sel", "yes"); }
    else if (k === "x") { pick(card, "sel", "no"); } else if (k === "e") { ev.preventDefault(); card.querySelector("input.note").focus(); }
    else { return; }
  });
  window.smoulderReview = { tsv: tsv, rows: function () { return Object.values(rows); } };
})();
