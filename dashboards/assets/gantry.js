// Gantry dashboard: the few live parts. Everything else works without this file.
// Loaded from /assets/gantry.js (the Content Security Policy allows no inline script).
// Elements opt in with data attributes:
//   data-live="NAME"   runs Gantry.live[NAME](element) once the page has loaded;
//   data-copy="ID"     a button that copies the text of element ID to the clipboard;
//   .js-only           hidden until this script runs (the class "hidden" is removed).
// Add a live part by adding a function to Gantry.live below.
"use strict";
(function () {
  var Gantry = (window.Gantry = { live: {} });

  function text(el, value) { el.textContent = value; }

  // A live log tail: <ul data-live="log-tail" data-src="/api/v1/agents/ID/logs/stream">.
  // Its form [data-log-search] restarts the stream with ?q=; each event is one record.
  Gantry.live["log-tail"] = function (list) {
    var source = null;
    var state = document.getElementById(list.getAttribute("data-state") || "");
    var form = document.querySelector("form[data-log-search='" + list.id + "']");
    var max = 500;
    function status(value) { if (state) text(state, value); }
    function start(query) {
      if (source) source.close();
      while (list.firstChild) list.removeChild(list.firstChild);
      var url = list.getAttribute("data-src") + (query ? "?q=" + encodeURIComponent(query) : "");
      source = new EventSource(url);
      status("Connecting…");
      source.onopen = function () { status("Live"); };
      source.onerror = function () { status("Reconnecting…"); };
      source.onmessage = function (event) {
        var record;
        try { record = JSON.parse(event.data); } catch (e) { return; }
        var item = document.createElement("li");
        var ts = document.createElement("span");
        ts.className = "ts";
        text(ts, (record.ts || "").replace("T", " ").replace("Z", ""));
        item.appendChild(ts);
        var body = document.createElement("span");
        if (record.stream === "stderr") body.className = "stderr";
        text(body, (record.container ? "[" + record.container + "] " : "") + (record.line || record.message || ""));
        item.appendChild(body);
        var atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
        list.appendChild(item);
        while (list.children.length > max) list.removeChild(list.firstChild);
        if (atBottom) list.scrollTop = list.scrollHeight;
      };
    }
    if (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var input = form.querySelector("input[name=q]");
        start(input ? input.value : "");
      });
    }
    var initial = form && form.querySelector("input[name=q]");
    start(initial ? initial.value : "");
  };

  // The agents list following the fleet live:
  // <div data-live="agent-list" data-src="/api/v1/agents/stream" data-state="ID"><table>.
  // Each `agent` event updates that agent's row (status, last seen, round trip), if shown.
  Gantry.live["agent-list"] = function (wrap) {
    var state = document.getElementById(wrap.getAttribute("data-state") || "");
    function status(value) { if (state) text(state, value); }
    function rowOf(id) {
      var links = wrap.querySelectorAll("a[href]");
      for (var i = 0; i < links.length; i++) {
        if (links[i].getAttribute("href") === "/agents/" + encodeURIComponent(id)) return links[i].closest("tr");
      }
      return null;
    }
    var source = new EventSource(wrap.getAttribute("data-src"));
    status("Connecting…");
    source.onopen = function () { status("Live: status updates as agents connect and disconnect."); };
    source.onerror = function () { status("Reconnecting…"); };
    source.addEventListener("agent", function (event) {
      var agent;
      try { agent = JSON.parse(event.data); } catch (e) { return; }
      var row = rowOf(agent.id);
      if (!row || row.cells.length < 7) return;
      var badge = document.createElement("span");
      badge.className = "status status-" + String(agent.status).replace(/[^a-z0-9_-]/gi, "");
      text(badge, agent.status);
      var cell = row.cells[1];
      while (cell.firstChild) cell.removeChild(cell.firstChild);
      cell.appendChild(badge);
      text(row.cells[5], agent.last_seen || "never");
      text(row.cells[6], typeof agent.rtt_ms === "number" ? agent.rtt_ms.toFixed(1) + " ms" : "");
    });
  };

  function copy(button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target) return;
    var value = target.textContent;
    var done = function () {
      var label = button.textContent;
      text(button, "Copied");
      setTimeout(function () { text(button, label); }, 1500);
    };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(value).then(done, function () { select(target); });
    } else {
      select(target);
    }
  }

  // Fallback: select the text so the user can press Ctrl+C.
  function select(target) {
    var range = document.createRange();
    range.selectNodeContents(target);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".js-only").forEach(function (el) { el.classList.remove("hidden"); });
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () { copy(button); });
    });
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var run = Gantry.live[el.getAttribute("data-live")];
      if (run) run(el);
    });
  });
})();
