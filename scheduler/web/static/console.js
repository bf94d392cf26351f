// Live regions poll only while the tab is visible (their hx-trigger filters on
// document.visibilityState); coming back to the tab refreshes them at once.
document.addEventListener("visibilitychange", function () {
  if (document.visibilityState === "visible") {
    document.body.dispatchEvent(new Event("visible-again"));
  }
});
