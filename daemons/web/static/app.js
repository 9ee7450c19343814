// harness web: live updates without polling. The server sends a Server-Sent Event
// "change" when the home changed; the page then fetches its live region once
// (X-Harness-Fragment: 1) and swaps it in. The HTML is rendered and escaped by the server;
// the Content-Security-Policy forbids inline script, so nothing in it can run.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var conn = document.getElementById("conn");
  var root = document.documentElement;

  function setConn(state, text) {
    if (conn) {
      conn.setAttribute("data-state", state);
      conn.textContent = text;
    }
  }

  var busy = false;
  var again = false;
  var latest = "";  // the newest generation announced by the server
  function refresh() {
    if (!live) { return; }
    if (busy) { again = true; return; }
    busy = true;
    var generation = latest;
    fetch(window.location.pathname + window.location.search, {
      headers: { "X-Harness-Fragment": "1" }, cache: "no-store", credentials: "same-origin"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (text) {
      live.innerHTML = text;
      root.setAttribute("data-live-generation", String(generation));
      setConn("live", "live");
    }).catch(function (err) {
      setConn("error", "update failed: " + err.message);
    }).then(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }

  if (root.getAttribute("data-live-generation") === "-1") {  // an error page
    setConn("off", "not live");
    return;
  }
  if (!live || !window.EventSource) {
    setConn("off", "live updates unavailable");
    return;
  }
  var source = new EventSource("/stream");
  var first = true;
  source.addEventListener("hello", function (event) {
    latest = event.data;
    // The page was rendered at the generation in data-live-generation: a change between
    // that render and this connection, or a reconnect (server restart), means it may be
    // stale, so fetch it once.
    if (!first || latest !== root.getAttribute("data-live-generation")) { refresh(); }
    first = false;
    setConn("live", "live");
  });
  source.addEventListener("change", function (event) { latest = event.data; refresh(); });
  source.onerror = function () { setConn("reconnecting", "reconnecting…"); };
})();
