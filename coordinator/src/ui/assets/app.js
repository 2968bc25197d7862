// Warpline dashboard: live updates by short polling (the server renders every fragment, so
// this script only swaps them in) and confirmations for destructive buttons. No dependencies.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var stamp = document.getElementById("live");
  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });
  if (!main) return;
  var every = parseInt(main.getAttribute("data-live") || "0", 10);
  if (!every) return;
  var busy = false;
  function editing() {
    var a = document.activeElement;
    return a && a !== document.body && a.closest && a.closest("main form") &&
      /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName) && !(a.tagName === "INPUT" && a.type === "submit");
  }
  function say(text) { if (stamp) stamp.textContent = text; }
  function tick() {
    if (busy || document.hidden || editing()) return;
    busy = true;
    fetch(window.location.href, {
      headers: { "X-Warpline-Partial": "1" }, credentials: "same-origin", cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) { window.location.reload(); return null; }
      if (!r.ok || r.headers.get("X-Warpline-Partial") !== "1") { say("live: HTTP " + r.status); return null; }
      return r.text();
    }).then(function (html) {
      if (html !== null && html !== undefined && !editing()) {
        main.innerHTML = html;
        say("live · " + new Date().toLocaleTimeString());
      }
    }).catch(function () {
      say("live: coordinator unreachable, retrying");
    }).then(function () { busy = false; });
  }
  say("live · " + new Date().toLocaleTimeString());
  window.setInterval(tick, every);
})();
