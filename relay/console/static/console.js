// Progressive enhancement only: every page works without this file.
// 1. Times are sent in UTC; show them in the viewer's local time, with UTC on hover.
// 2. The overview's chart refreshes itself every 30 seconds.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (!Number.isNaN(when.getTime())) {
      el.title = el.getAttribute("datetime") + " (UTC)";
      el.textContent = when.toLocaleString();
    }
  }
  const chart = document.getElementById("chart");
  if (chart && chart.dataset.src) {
    setInterval(async () => {
      const answer = await fetch(chart.dataset.src, { credentials: "same-origin" });
      if (answer.ok) chart.innerHTML = await answer.text();
    }, 30000);
  }
});
