// Gantry dashboard: live parts of the deployment pages. Loaded after /assets/gantry.js
// (both deferred, in document order), it adds its parts to Gantry.live.
"use strict";
(function () {
  var Gantry = window.Gantry;
  if (!Gantry) return;

  // Progress of a deployment per agent:
  // <tbody data-live="deploy-progress" data-src="/api/v1/deployments/ID/progress"
  //        data-revision="N" data-summary="ID" data-state="ID"> with one
  // <tr data-agent="AGENT"> per agent (cells .state .rev .msg .at). Each `status` event
  // of the stream updates (or adds) its agent's row and the summary line.
  Gantry.live["deploy-progress"] = function (body) {
    var revision = parseInt(body.getAttribute("data-revision"), 10);
    var summary = document.getElementById(body.getAttribute("data-summary") || "");
    var state = document.getElementById(body.getAttribute("data-state") || "");
    function set(row, cls, value) {
      var cell = row.querySelector("." + cls);
      if (cell) cell.textContent = value;
    }
    function badge(row, value) {
      var cell = row.querySelector(".state");
      if (!cell) return;
      while (cell.firstChild) cell.removeChild(cell.firstChild);
      var span = document.createElement("span");
      span.className = "status status-" + value.replace(/[^a-z0-9_-]/gi, "");
      span.textContent = value;
      cell.appendChild(span);
      row.setAttribute("data-state", value);
      row.setAttribute("data-revision", "");
    }
    function rowFor(agent) {
      var rows = body.querySelectorAll("tr[data-agent]");
      for (var i = 0; i < rows.length; i++) {
        if (rows[i].getAttribute("data-agent") === agent) return rows[i];
      }
      var row = document.createElement("tr");
      row.setAttribute("data-agent", agent);
      ["name", "state", "rev", "msg", "at"].forEach(function (cls) {
        var cell = document.createElement("td");
        cell.className = cls;
        row.appendChild(cell);
      });
      set(row, "name", agent);
      body.appendChild(row);
      return row;
    }
    function recount() {
      if (!summary) return;
      var rows = body.querySelectorAll("tr[data-agent]");
      var healthy = 0;
      for (var i = 0; i < rows.length; i++) {
        var row = rows[i];
        var rev = parseInt((row.querySelector(".rev") || {}).textContent, 10);
        var st = (row.querySelector(".state") || {}).textContent;
        if (st === "healthy" && rev === revision) healthy++;
      }
      summary.textContent = healthy + " of " + rows.length + " agents healthy on revision " + revision;
    }
    var source = new EventSource(body.getAttribute("data-src"));
    if (state) state.textContent = "connecting…";
    source.onopen = function () { if (state) state.textContent = "live"; };
    source.onerror = function () { if (state) state.textContent = "reconnecting…"; };
    source.addEventListener("status", function (event) {
      var s;
      try { s = JSON.parse(event.data); } catch (e) { return; }
      var row = rowFor(s.agent);
      badge(row, s.state || "");
      set(row, "rev", String(s.revision));
      set(row, "msg", s.message || "");
      set(row, "at", s.updated_at || "");
      recount();
    });
  };
})();
