// Progressive enhancement only: every page works without this file.
// - [data-dialog] links open their <dialog> as a modal (focus trapped, Esc closes) instead of
//   reloading the page with ?dialog=...;
// - a dialog rendered open by the server (validation errors) becomes modal, and gives the
//   focus to its button when it closes;
// - forms marked [data-once] disable their submit button once sent (the server's idempotency
//   key is what really prevents a double grant);
// - a table wider than the screen scrolls inside its .table-wrap: while it does, that region
//   takes the keyboard focus (the arrow keys scroll it) and is named after its table.
"use strict";

function tableName(wrap) {
  var caption = wrap.querySelector("caption");
  var section = wrap.closest("section, dialog");
  var heading = section && section.querySelector("h2, h3");
  return ((caption || heading || document.querySelector("h1") || {}).textContent || "").trim();
}

// Only while it really scrolls: on a wide screen the region would be a useless tab stop.
function scrollableTables() {
  document.querySelectorAll(".table-wrap").forEach(function (wrap) {
    var scrolls = wrap.scrollWidth > wrap.clientWidth + 1;
    if (scrolls && !wrap.hasAttribute("data-scrolls")) {
      wrap.setAttribute("data-scrolls", "");
      wrap.setAttribute("tabindex", "0");
      wrap.setAttribute("role", "region");
      wrap.setAttribute("aria-label", tableName(wrap));
    } else if (!scrolls && wrap.hasAttribute("data-scrolls")) {
      ["data-scrolls", "tabindex", "role", "aria-label"].forEach(function (name) { wrap.removeAttribute(name); });
    }
  });
}

document.addEventListener("DOMContentLoaded", function () {
  scrollableTables();
  var pending = false;
  window.addEventListener("resize", function () {
    if (pending) { return; }
    pending = true;
    window.requestAnimationFrame(function () { pending = false; scrollableTables(); });
  });
  document.querySelectorAll("details").forEach(function (details) {
    details.addEventListener("toggle", scrollableTables);  // a table inside shows only when opened
  });
  document.querySelectorAll("a[data-dialog]").forEach(function (link) {
    var dialog = document.getElementById(link.getAttribute("data-dialog"));
    if (!dialog || typeof dialog.showModal !== "function") { return; }
    link.setAttribute("aria-haspopup", "dialog");  // announced as opening a dialog, not a page
    link.addEventListener("click", function (event) {
      event.preventDefault();
      dialog.showModal();
    });
  });
  document.querySelectorAll("dialog").forEach(function (dialog) {
    // The browser gives the focus back to what opened a dialog; one the server opened (a
    // refused form) had no opener, so its button takes the focus rather than the page's start.
    dialog.addEventListener("close", function () {
      var active = document.activeElement;
      if (active && active !== document.body && !dialog.contains(active)) { return; }
      var opener = document.querySelector("a[data-dialog='" + dialog.id + "']");
      if (opener) { opener.focus(); }
    });
  });
  document.querySelectorAll("dialog[open]").forEach(function (dialog) {
    if (typeof dialog.showModal === "function") {
      dialog.close();
      dialog.showModal();
      var invalid = dialog.querySelector("[aria-invalid=true]");
      if (invalid) { invalid.focus(); }
    }
  });
  document.querySelectorAll("form[data-once]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      var submitter = event.submitter;
      if (submitter && submitter.getAttribute("formmethod") === "dialog") { return; }
      form.querySelectorAll("button[type=submit]:not([formmethod])").forEach(function (button) {
        // Disabled after the submission has started, so the button's own value is still sent.
        setTimeout(function () { button.disabled = true; }, 0);
      });
    });
  });
});
