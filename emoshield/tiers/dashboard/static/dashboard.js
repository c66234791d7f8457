// emoshield edge dashboard: live updates over server-sent events. The page works without this
// script (server-rendered sections, plain forms); with it, sections refresh as the edge changes
// and each device gets a timeline of faces per emotion per heartbeat interval. No innerHTML of
// device data: section fragments come rendered (and escaped) by the edge, the rest is textContent.
"use strict";
(function () {
  const INTERVALS = 60;  // columns drawn per device
  const W = 600, H = 90;
  const SVG = "http://www.w3.org/2000/svg";
  const box = document.getElementById("timelines");
  const classes = (box.dataset.classes || "").split(",").filter(Boolean);
  const history = new Map();  // device id -> [{emotions, time}]
  const status = document.getElementById("live-status");

  function colour(label) {
    const i = classes.indexOf(label);
    return i < 0 ? "emo-other" : "emo-" + (i % 10);
  }

  function deviceName(id) {
    const row = document.querySelector('tr[data-device="' + CSS.escape(id) + '"] strong');
    return row ? row.textContent : id;
  }

  function card(id) {
    let el = box.querySelector('.timeline[data-device="' + CSS.escape(id) + '"]');
    if (!el) {
      el = document.createElement("div");
      el.className = "timeline";
      el.dataset.device = id;
      const title = document.createElement("h3");
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 " + W + " " + H);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("role", "img");
      const now = document.createElement("div");
      now.className = "now";
      el.append(title, svg, now);
      box.append(el);
    }
    el.querySelector("h3").textContent = deviceName(id) + " (" + id + ")";
    return el;
  }

  function draw(id) {
    const el = card(id), svg = el.querySelector("svg"), items = history.get(id);
    while (svg.firstChild) svg.firstChild.remove();
    const col = W / INTERVALS, shown = items.slice(-INTERVALS);
    shown.forEach(function (item, i) {
      const x = (INTERVALS - shown.length + i) * col;
      const counts = item.emotions || {};
      const total = Object.values(counts).reduce(function (a, b) { return a + b; }, 0);
      if (!total) {
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", x + 1); r.setAttribute("y", H - 3); r.setAttribute("width", col - 2); r.setAttribute("height", 3);
        r.setAttribute("class", "empty-interval");
        svg.append(r);
        return;
      }
      let y = H;
      Object.keys(counts).sort().forEach(function (label) {
        const h = H * counts[label] / total;
        y -= h;
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", x + 1); r.setAttribute("y", y); r.setAttribute("width", col - 2); r.setAttribute("height", h);
        r.setAttribute("class", colour(label));
        const tip = document.createElementNS(SVG, "title");
        tip.textContent = label + ": " + counts[label];
        r.append(tip);
        svg.append(r);
      });
    });
    el.dataset.intervals = String(items.length);
    const last = items[items.length - 1], counts = last.emotions || {};
    const total = Object.values(counts).reduce(function (a, b) { return a + b; }, 0);
    const parts = Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a]; })
      .map(function (label) { return label + " " + Math.round(100 * counts[label] / total) + "%"; });
    el.querySelector(".now").textContent = (total ? "now: " + parts.join(" · ") + " (" + total + " faces" : "now: no face (0 faces")
      + (last.interval ? " in " + last.interval.toFixed(1) + " s" : "") + ")"
      + (last.version !== null ? ", bundle v" + last.version : "")
      + (last.fps !== null ? ", " + last.fps.toFixed(1) + " FPS" : "");
    svg.setAttribute("aria-label", el.querySelector(".now").textContent);
  }

  const dirty = new Set();  // devices to redraw at the next animation frame (one redraw per burst)

  function heartbeat(event) {
    let data;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    if (typeof data.device !== "string") return;
    if (!history.has(data.device)) history.set(data.device, []);
    const items = history.get(data.device);
    items.push(data);
    if (items.length > 4 * INTERVALS) items.splice(0, items.length - 4 * INTERVALS);
    if (!dirty.size) window.requestAnimationFrame(function () { dirty.forEach(draw); dirty.clear(); });
    dirty.add(data.device);
  }

  function state(event) {
    let data;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    ["devices", "jobs", "bundles"].forEach(function (name) {
      const view = document.getElementById(name + "-view");
      if (view && typeof data[name] === "string") view.innerHTML = data[name];  // rendered and escaped by the edge
    });
    const enrolled = new Set(Array.from(document.querySelectorAll("tr[data-device]")).map(function (r) { return r.dataset.device; }));
    box.querySelectorAll(".timeline").forEach(function (el) {  // a revoked device leaves the timeline
      if (!enrolled.has(el.dataset.device)) { history.delete(el.dataset.device); el.remove(); }
    });
    history.forEach(function (_items, id) { card(id); });
  }

  // The browser reconnects a dropped stream by itself (with Last-Event-ID); a refused one (401 after
  // an edge restart, 429 when too many are open) it closes for good: ask why, then log in or retry.
  // A new stream starts with the edge's whole backlog, so what was drawn is dropped first.
  let source = null, backoff = 2000;

  function connect() {
    history.clear();
    box.replaceChildren();
    source = new EventSource("/dashboard/events");
    source.addEventListener("heartbeat", heartbeat);
    source.addEventListener("state", state);
    source.addEventListener("logout", function () { source.close(); window.location.assign("/login"); });
    source.onopen = function () { backoff = 2000; status.textContent = "live"; status.classList.add("on"); };
    source.onerror = function () {
      status.textContent = "reconnecting…";
      status.classList.remove("on");
      if (source.readyState !== EventSource.CLOSED) return;
      fetch("/dashboard/state", { credentials: "same-origin" }).then(function (answer) {
        if (answer.status === 401) { window.location.assign("/login"); return; }
        window.setTimeout(connect, backoff);
        backoff = Math.min(2 * backoff, 60000);
      }, function () { window.setTimeout(connect, backoff); backoff = Math.min(2 * backoff, 60000); });
    };
  }
  connect();
  document.addEventListener("submit", function (event) {  // a revoke asks first (the form works without it)
    if (event.target.classList.contains("revoke") && !window.confirm("Revoke this device? Its token stops working at once.")) {
      event.preventDefault();
    }
  });
})();
