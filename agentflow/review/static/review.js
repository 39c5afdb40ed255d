// The review page's only script: live inbox updates (server-sent events), and "select all"
// for bulk decisions. No inline script anywhere: the page's CSP allows this file only.
(function () {
  "use strict";

  function checkedValues(root) {
    var out = {};
    root.querySelectorAll("input[name=item]:checked").forEach(function (box) {
      out[box.value] = true;
    });
    return out;
  }

  function liveInbox(items) {
    var url = document.body.getAttribute("data-events");
    if (!url || !window.EventSource || !window.fetch) return;
    var busy = false;
    var again = false;

    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(items.getAttribute("data-fragment"), {
        credentials: "same-origin",
        headers: { "Accept": "text/html" },
        redirect: "manual",
      }).then(function (reply) {
        if (reply.status !== 200) return null;  // signed out, say: leave the page as it is
        return reply.text();
      }).then(function (html) {
        if (html === null) return;
        var kept = checkedValues(items);
        var parsed = new DOMParser().parseFromString(html, "text/html");
        items.replaceChildren.apply(items, Array.prototype.slice.call(parsed.body.childNodes));
        items.querySelectorAll("input[name=item]").forEach(function (box) {
          if (kept[box.value]) box.checked = true;
        });
        items.dispatchEvent(new CustomEvent("inbox:updated", { bubbles: true }));
      }).catch(function () {
        // the server is away for a moment: the next event fetches again
      }).finally(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
    }

    var source = new EventSource(url);
    source.addEventListener("approvals", refresh);
  }

  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target && target.id === "select-all") {
      document.querySelectorAll("input[name=item]").forEach(function (box) {
        box.checked = target.checked;
      });
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var items = document.getElementById("inbox-items");
    if (items) liveInbox(items);
  });
})();
