// qalign web page: drop images or a video, POST them to /v1/score, show each score with its
// five-level probability bars. No external assets; user data only ever goes into textContent.
(function () {
  "use strict";
  const LEVELS = ["bad", "poor", "fair", "good", "excellent"];
  const $ = (id) => document.getElementById(id);
  const statusEl = $("status"), drop = $("drop"), input = $("files"), taskEl = $("task");
  const results = $("results"), message = $("message"), template = $("card-template");
  let maxItems = 64;
  let ready = false;

  function setStatus(text, cls) {
    statusEl.textContent = text;
    statusEl.className = "status " + cls;
  }

  function showMessage(text) {
    message.textContent = text || "";
    message.hidden = !text;
  }

  async function pollReady() {
    try {
      const r = await fetch("/readyz", { cache: "no-store" });
      const body = await r.json();
      if (r.ok) {
        ready = true;
        await loadModel();
        return;
      }
      if (body.status === "failed") {
        setStatus("model failed to load: " + (body.error || "unknown error"), "failed");
        return;
      }
      setStatus("loading model " + (body.model || "") + "…", "loading");
    } catch (e) {
      setStatus("server unreachable, retrying…", "loading");
    }
    setTimeout(pollReady, 500);
  }

  async function loadModel() {
    try {
      const r = await fetch("/v1/models", { cache: "no-store" });
      const body = await r.json();
      const m = body.data && body.data[0];
      if (m) {
        setStatus("ready: " + m.id, "ready");
        taskEl.textContent = "";
        for (const t of m.tasks || ["quality"]) {
          const o = document.createElement("option");
          o.value = t; o.textContent = t;
          taskEl.appendChild(o);
        }
      }
      if (body.limits) {
        maxItems = body.limits.max_items || maxItems;
        $("limits").textContent = "up to " + maxItems + " files, " +
          Math.round(body.limits.max_request_bytes / 1048576) + " MiB per request";
      }
    } catch (e) {
      setStatus("ready", "ready");
    }
  }

  function makeCard(file) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.classList.add("pending");
    card.querySelector(".name").textContent = file.name;
    card.querySelector(".name").title = file.name;
    const thumb = card.querySelector(".thumb");
    const url = URL.createObjectURL(file);
    let media;
    if (file.type.startsWith("video/")) {
      media = document.createElement("video");
      media.muted = true; media.preload = "metadata";
    } else {
      media = document.createElement("img");
      media.alt = "";
    }
    media.addEventListener("error", () => media.remove());  // not displayable here (e.g. a text file)
    media.src = url;
    thumb.appendChild(media);
    const probs = card.querySelector(".probs");
    for (const level of LEVELS) {
      const li = document.createElement("li");
      li.dataset.level = level;
      const label = document.createElement("span"); label.textContent = level;
      const bar = document.createElement("span"); bar.className = "bar";
      const fill = document.createElement("span"); fill.className = level; fill.style.width = "0%";
      bar.appendChild(fill);
      const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = "";
      li.append(label, bar, pct);
      probs.appendChild(li);
    }
    results.prepend(card);
    return card;
  }

  function fillCard(card, row) {
    card.classList.remove("pending");
    const scoreEl = card.querySelector(".score"), levelEl = card.querySelector(".level");
    if (row.error) {
      card.classList.add("failed");
      scoreEl.textContent = "–";
      levelEl.textContent = "error";
      const err = card.querySelector(".error");
      err.textContent = row.error;
      err.hidden = false;
      return;
    }
    card.classList.add("scored");
    scoreEl.textContent = row.score_1_5.toFixed(2);
    levelEl.textContent = row.level;
    levelEl.className = "level " + row.level;
    card.querySelector(".unit").textContent = "[0, 1]: " + row.score_0_1.toFixed(3) +
      (row.kind === "video" ? " · video, " + row.frames + " frames" : "");
    for (const li of card.querySelectorAll(".probs li")) {
      const p = row.probs[li.dataset.level];
      li.querySelector(".bar span").style.width = (100 * p).toFixed(1) + "%";
      li.querySelector(".pct").textContent = (100 * p).toFixed(1) + "%";
    }
    if (row.warnings && row.warnings.length) {
      const err = card.querySelector(".error");
      err.textContent = row.warnings.join("; ");
      err.hidden = false;
    }
  }

  function failCards(cards, text) {
    for (const card of cards) fillCard(card, { error: text });
  }

  async function scoreFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    showMessage("");
    if (!ready) { showMessage("the model is still loading; try again in a moment"); return; }
    // One request per chunk of maxItems files.
    for (let start = 0; start < files.length; start += maxItems) {
      const chunk = files.slice(start, start + maxItems);
      const cards = chunk.map(makeCard);
      const form = new FormData();
      for (const f of chunk) form.append("file", f, f.name);
      form.append("task", taskEl.value || "quality");
      let response, body;
      try {
        response = await fetch("/v1/score", { method: "POST", body: form });
        body = await response.json();
      } catch (e) {
        failCards(cards, "request failed: " + e);
        continue;
      }
      if (body && Array.isArray(body.results)) {
        body.results.forEach((row, i) => cards[i] && fillCard(cards[i], row));
      } else {
        const text = (body && body.error && body.error.message) || ("HTTP " + response.status);
        failCards(cards, text);
        showMessage(text);
      }
    }
  }

  input.addEventListener("change", () => { scoreFiles(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "dragend"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    scoreFiles(e.dataTransfer && e.dataTransfer.files);
  });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("clear").addEventListener("click", () => {
    for (const el of results.querySelectorAll("img, video")) URL.revokeObjectURL(el.src);
    results.textContent = "";
    showMessage("");
  });
  pollReady();
})();
