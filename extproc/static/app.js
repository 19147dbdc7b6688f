// Progressive enhancement only: every page works without this file.
// - [data-dialog] links open their <dialog> as a modal (focus trapped, Esc closes) instead of
//   reloading the page with ?dialog=...;
// - a dialog rendered open by the server (validation errors) becomes modal;
// - forms marked [data-once] disable their submit button once sent (the server's idempotency
//   key is what really prevents a double grant).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("a[data-dialog]").forEach(function (link) {
    link.addEventListener("click", function (event) {
      var dialog = document.getElementById(link.getAttribute("data-dialog"));
      if (dialog && typeof dialog.showModal === "function") {
        event.preventDefault();
        dialog.showModal();
      }
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
