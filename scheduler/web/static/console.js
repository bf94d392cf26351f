// The console's only script besides htmx. The Content-Security-Policy allows no inline script,
// no inline event handler and no eval: whatever a page does in the browser is here.

// Live regions ([data-live]) poll only while the tab is visible: a poll is cancelled while it is
// hidden, and coming back to the tab refreshes them at once.
document.addEventListener("visibilitychange", function () {
  if (document.visibilityState === "visible") {
    document.body.dispatchEvent(new Event("visible-again"));
  }
});
document.addEventListener("htmx:beforeRequest", function (event) {
  var elt = event.detail && event.detail.elt;
  if (document.visibilityState !== "visible" && elt && elt.hasAttribute("data-live")) {
    event.preventDefault();
  }
});

// A <select data-autosubmit> submits its form when changed (the timeline's range).
document.addEventListener("change", function (event) {
  var target = event.target;
  if (target instanceof HTMLSelectElement && target.hasAttribute("data-autosubmit") && target.form) {
    target.form.submit();
  }
});
