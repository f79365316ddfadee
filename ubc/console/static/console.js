// The console's one script (no inline script anywhere: the CSP forbids it).
// Live progress of an epoch being opened or closed: every <progress data-live-epoch="N">
// is refreshed from the public GET /api/epochs/N once a second until the epoch is open
// or closed.
"use strict";

(function () {
  const POLL_MS = 1000;

  function refresh(bar) {
    const number = bar.dataset.liveEpoch;
    const row = bar.closest("tr");
    fetch("/api/epochs/" + encodeURIComponent(number), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (epoch) {
        const closing = epoch.status === "closing" || epoch.status === "closed";
        const done = closing ? epoch.expired_members : epoch.applied;
        bar.max = Math.max(epoch.members, 1);
        bar.value = done;
        const text = row && row.querySelector(".progress-text");
        if (text) {
          text.textContent = done + " of " + epoch.members;
        }
        const status = row && row.querySelector(".status");
        if (status) {
          status.textContent = epoch.status;
        }
        if (epoch.status === "opening" || epoch.status === "closing") {
          window.setTimeout(function () { refresh(bar); }, POLL_MS);
        } else {
          delete bar.dataset.liveEpoch;
          bar.dataset.settled = epoch.status;
        }
      })
      .catch(function () {
        window.setTimeout(function () { refresh(bar); }, POLL_MS * 5);
      });
  }

  function start() {
    document.querySelectorAll("progress[data-live-epoch]").forEach(refresh);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
