"""The console in a real headless browser (Debian's chromium and chromium-driver, Selenium)
against a real redis-server, scheduler and Celery worker: the overview, finding a job, pausing
it with a note (``chronoq jobs show`` agrees), running it and watching the run appear in its
history as the page refreshes itself, creating a job through the form and seeing it fire, and
the auth and CSRF refusals, every page under the Content-Security-Policy with nothing loaded
from elsewhere, and the console refusing to be framed. One browser for the module."""

from __future__ import annotations

import contextlib
import http.server
import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from shared.settings import AppSettings
from tests.conftest import RedisServer, SchedulerProcess, chronoq, executions, wait_for, write_jobs
from tests.web.conftest import ConsoleProcess, CountingProxy

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
)  # fmt: skip

POLL_S = 1  # WEB_POLL_S of the consoles below: the pages refresh every second, not every 5

pytestmark = pytest.mark.timeout(180)  # chromium and chromium-driver: scripts/test-tools.txt


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console's log: CSP violations
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def until(browser: WebDriver, condition: Callable[[WebDriver], Any], what: str, timeout_s: float = 30) -> Any:
    # A live region swapped between finding an element and reading it: look again.
    wait = WebDriverWait(browser, timeout_s, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(condition, message=f"waiting for {what}")


def text(browser: WebDriver, css: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, css).text)


def text_when(browser: WebDriver, css: str, ready: Callable[[str], bool], what: str, timeout_s: float = 30) -> str:
    """The text of ``css`` as read when ``ready(text)`` first holds: one reading, so that what a
    test asserts next about it is about the same version of a live region."""

    def reading(b: WebDriver) -> str | None:
        found = text(b, css)
        return found if ready(found) else None

    return str(until(browser, reading, what, timeout_s))


def click(browser: WebDriver, by: str, value: str, what: str) -> None:
    """Click an element, found again if a region was swapped between finding and clicking it."""

    def clicked(b: WebDriver) -> bool:
        b.find_element(by, value).click()
        return True

    until(browser, clicked, what)


def no_request_in_flight(browser: WebDriver) -> bool:
    """No htmx request of the page is waiting for its answer (htmx marks its element meanwhile)."""
    return not browser.execute_script("return document.querySelector('.htmx-request') !== null")


@pytest.fixture
def fleet(settings: AppSettings, tmp_path: Path, start_scheduler: Any, start_worker: Any) -> SchedulerProcess:
    jobs: list[dict[str, Any]] = [
        {"id": "orders-sync", "task": "demo.record_fire", "interval": 3600},
        {"id": "report-daily", "task": "demo.record_fire", "cron": "0 2 * * *"},
    ]
    replicas: list[SchedulerProcess] = start_scheduler(settings, write_jobs(tmp_path / "jobs.yaml", jobs))
    start_worker(settings)
    return replicas[0]


def test_operator_flow(
    browser: WebDriver,
    settings: AppSettings,
    fleet: SchedulerProcess,
    start_console: Any,
    redis_server: RedisServer,
) -> None:
    console: ConsoleProcess = start_console(settings, extra_env={"WEB_POLL_S": str(POLL_S)})
    browser.get(console.url + "/")
    until(browser, lambda b: fleet.owner in b.page_source, "the overview to name the leader")
    assert "Replicas alive" in browser.page_source

    browser.find_element(By.LINK_TEXT, "Jobs").click()
    until(browser, lambda b: "2 jobs" in text(b, "#jobs-count"), "the jobs list")
    browser.find_element(By.ID, "q").send_keys("orders")
    # Keys typed more than the 300 ms debounce apart (a loaded machine) search for "ord" first,
    # which narrows the table as well: wait for the search of the whole word.
    until(
        browser,
        lambda b: "q=orders" in b.current_url and text(b, "#jobs-count").startswith("1 job,"),
        "the search to narrow the table, its query in the URL (a link can be shared)",
    )
    click(browser, By.LINK_TEXT, "orders-sync", "the job's link")

    until(browser, lambda b: text(b, "#job-id") == "orders-sync", "the job page")
    browser.find_element(By.ID, "pause-note").send_keys("supplier API down until 14:00")
    browser.find_element(By.ID, "pause-button").click()
    until(browser, lambda b: "paused orders-sync" in b.page_source, "the pause to be confirmed")
    shown = json.loads(chronoq(settings, "jobs", "show", "orders-sync", "--json").stdout)
    assert (shown["paused"], shown["paused_note"]) == (True, "supplier API down until 14:00")

    browser.find_element(By.ID, "trigger-button").click()
    until(browser, lambda b: "triggered orders-sync: dispatched" in b.page_source, "the trigger to be confirmed")
    # No reload: the history is a live region that refreshes itself while the tab is visible.
    history = text_when(browser, "#history", lambda t: "succeeded" in t, "the manual run to appear in the history")
    assert "manual" in history

    browser.get(console.url + "/new")
    browser.find_element(By.NAME, "id").send_keys("made-in-browser")
    browser.find_element(By.NAME, "task").send_keys("demo.record_fire")
    Select(browser.find_element(By.NAME, "kind")).select_by_value("interval")
    browser.find_element(By.NAME, "schedule").send_keys("2")
    browser.find_element(By.NAME, "note").send_keys("from the form")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(browser, lambda b: "created made-in-browser" in b.page_source, "the new job's page")
    until(browser, lambda b: "succeeded" in text(b, "#history"), "the new job to fire and run", timeout_s=45)
    with redis_server.client() as r:
        assert any(e["job_id"] == "made-in-browser" for e in executions(r, settings))


def test_bad_form_input_names_job_and_field(browser: WebDriver, settings: AppSettings, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    browser.get(console.url + "/new")
    browser.find_element(By.NAME, "id").send_keys("broken")
    browser.find_element(By.NAME, "task").send_keys("demo.sleep")
    browser.find_element(By.NAME, "schedule").send_keys("61 * * * *")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(browser, lambda b: b.find_elements(By.ID, "errors"), "the error")
    assert "job 'broken': cron" in text(browser, "#errors")
    assert browser.find_element(By.NAME, "schedule").get_attribute("value") == "61 * * * *", "the form keeps input"


def test_auth_and_csrf_refusals(
    browser: WebDriver, settings: AppSettings, start_console: Any, redis_server: RedisServer
) -> None:
    env = {"WEB_USERNAME": "ops", "WEB_PASSWORD": "pw-5d1c9e"}
    console: ConsoleProcess = start_console(settings, extra_env=env)
    with console.http(auth=("ops", "pw-5d1c9e")) as http:
        spec = {"id": "guarded", "task": "demo.sleep", "cron": "0 2 * * *"}
        assert http.post("/api/v1/jobs", json={"spec": spec}).status_code == 201
    browser.get(console.url + "/jobs/guarded")
    assert not browser.find_elements(By.ID, "pause-note"), "no page without credentials"
    host = console.url.removeprefix("http://")
    browser.get(f"http://ops:{quote('pw-5d1c9e')}@{host}/jobs/guarded")
    until(browser, lambda b: b.find_elements(By.ID, "pause-note"), "the job page with credentials")
    anonymous = (
        "const done = arguments[0]; fetch(location.origin + '/jobs', {credentials: 'omit'})"
        ".then(r => done(r.status), e => done(String(e)))"
    )
    assert browser.execute_async_script(anonymous) == 401
    # A forged token in the page's own form: refused, nothing paused.
    browser.execute_script("document.querySelectorAll('input[name=csrf]').forEach(e => e.value = 'forged.0')")
    browser.find_element(By.ID, "pause-note").send_keys("should not pause")
    browser.find_element(By.ID, "pause-button").click()
    until(browser, lambda b: "CSRF token missing or invalid" in b.page_source, "the CSRF refusal")
    # Another page (another origin) posting a valid-looking form: refused as well.
    form = (
        f"<form method=post action='{console.url}/jobs/guarded/pause'><input name=csrf value=x.y>"
        "<input name=note value=evil></form><script>document.forms[0].submit()</script>"
    )
    browser.get("data:text/html," + quote(form))
    until(browser, lambda b: "403" in b.page_source or "CSRF" in b.page_source, "the cross-origin refusal")
    with redis_server.client() as r:
        assert r.hget(f"{settings.redis.key_prefix}paused", "guarded") is None


def set_visibility(browser: WebDriver, state: str) -> None:
    """What a browser does when its tab is hidden or shown again: ``document.visibilityState``
    (and ``hidden``) change, then ``visibilitychange`` is dispatched on the document."""
    browser.execute_script(
        "const state = arguments[0];"
        "Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => state});"
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => state === 'hidden'});"
        "document.dispatchEvent(new Event('visibilitychange'));",
        state,
    )


def test_live_updates_stop_while_the_tab_is_hidden(
    browser: WebDriver, settings: AppSettings, start_console: Any, namespace: str
) -> None:
    console: ConsoleProcess = start_console(settings, extra_env={"WEB_POLL_S": str(POLL_S)})
    with console.http() as http:
        for job_id in ("seen-1", "quiet-1"):
            spec = {"id": job_id, "task": "demo.sleep", "args": [0], "cron": "0 2 * * *", "queue": f"none_{namespace}"}
            assert http.post("/api/v1/jobs", json={"spec": spec}).status_code == 201
        assert http.post("/api/v1/jobs/seen-1/trigger", json={}).json()["outcome"] == "dispatched"
    proxy = CountingProxy(int(console.url.rsplit(":", 1)[1]))
    try:
        # The last-outcome filter, in the browser.
        browser.get(proxy.url + "/jobs")
        until(browser, lambda b: "2 jobs" in text(b, "#jobs-count"), "the jobs list")
        Select(browser.find_element(By.NAME, "outcome")).select_by_value("dispatched")
        # One reading of the table: its count and its row, as swapped in by the filter.
        table = text_when(browser, "#jobs-table", lambda t: t.startswith("1 job,"), "the outcome filter to narrow it")
        assert "seen-1" in table, "the dispatched job"
        assert "outcome=dispatched" in browser.current_url, "the filter is in the URL (a link can be shared)"
        Select(browser.find_element(By.NAME, "outcome")).select_by_value("never")
        until(browser, lambda b: "quiet-1" in text(b, "#jobs-table") and "seen-1" not in text(b, "#jobs-table"),
              "the never-run jobs")  # fmt: skip

        browser.get(proxy.url + "/jobs/seen-1")
        until(browser, lambda b: text(b, "#job-id") == "seen-1", "the job page")

        def polls() -> list[float]:  # the page load, then its live region's polls
            return proxy.seen("/jobs/seen-1")

        wait_for(lambda: len(polls()) >= 3, 3 * POLL_S + 10, "the live region to poll twice")

        set_visibility(browser, "hidden")
        # A poll sent just before the tab was hidden may reach the proxy after it: count from
        # when it has been answered.
        until(browser, no_request_in_flight, "the last poll before hiding to be answered")
        hidden_at = len(polls())
        # Hidden for five poll intervals: the server receives no poll at all.
        with pytest.raises(pytest.fail.Exception):
            wait_for(lambda: len(polls()) > hidden_at, 5 * POLL_S, "a poll while hidden")
        assert len(polls()) == hidden_at

        set_visibility(browser, "visible")
        wait_for(lambda: len(polls()) > hidden_at, 3, "the refresh on becoming visible (at once)")
        wait_for(lambda: len(polls()) > hidden_at + 1, POLL_S + 5, "the polling to resume")
        until(browser, lambda b: text(b, "#job-id") == "seen-1", "the page after the refresh")
    finally:
        proxy.close()


def severe(browser: WebDriver) -> list[str]:
    """The browser console's errors since the last call: a CSP violation (a refused inline script,
    style, eval or framing), a failed load (a 404, an unreachable CDN), an uncaught exception."""
    entries = cast(Any, browser).get_log("browser")  # Chromium's driver has it; the remote type does not
    return [str(entry["message"]) for entry in entries if entry["level"] == "SEVERE"]


def resources(browser: WebDriver) -> list[str]:
    """Every URL the page loaded (the document's resource timing entries)."""
    return list(browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))


def test_every_page_passes_the_csp_loads_nothing_from_elsewhere_and_still_works(
    browser: WebDriver, settings: AppSettings, start_console: Any, redis_server: RedisServer, namespace: str
) -> None:
    console: ConsoleProcess = start_console(settings, extra_env={"WEB_POLL_S": str(POLL_S)})
    with console.http() as http:
        spec = {"id": "csp-job", "task": "demo.sleep", "cron": "0 2 * * *", "queue": f"none_{namespace}"}
        assert http.post("/api/v1/jobs", json={"spec": spec}).status_code == 201
    severe(browser)  # what earlier tests left in the log
    pages = ["/", "/jobs", "/jobs/csp-job", "/new", "/timeline?minutes=60", "/api/v1/docs", "/jobs/absent"]
    for path in pages:
        browser.get(console.url + path)
        until(browser, lambda b: b.execute_script("return document.readyState") == "complete", f"{path} to load")
        until(browser, lambda b: b.execute_script("return typeof htmx === 'object'"), f"htmx on {path}")
        # The error page's own status is logged as a failed load: any other entry is a fault.
        own = f"{console.url}{path} - Failed to load resource: the server responded with a status of 404"
        assert [m for m in severe(browser) if not m.startswith(own)] == [], f"{path}: errors in the browser's console"
        elsewhere = [url for url in resources(browser) if not url.startswith(console.url + "/")]
        assert elsewhere == [], f"{path} loaded from elsewhere"
    browser.get(console.url + "/api/v1/docs")
    headings = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "h3.op")]
    assert "POST /api/v1/jobs/{job_id}/backfill" in headings and "BackfillRequest" in headings
    assert browser.find_elements(By.CSS_SELECTOR, "link[rel=icon]"), "a favicon, so no page logs its 404"

    # htmx still refreshes a live region (no eval needed), and a form still posts.
    browser.get(console.url + "/jobs/csp-job")
    browser.execute_script(
        "window.polls = 0; document.body.addEventListener('htmx:afterRequest', () => window.polls++)"
    )
    until(browser, lambda b: b.execute_script("return window.polls") >= 2, "two polls of the live region")
    browser.find_element(By.ID, "pause-note").send_keys("under the CSP")
    browser.find_element(By.ID, "pause-button").click()
    until(browser, lambda b: "paused csp-job" in b.page_source, "the pause to be confirmed")
    with redis_server.client() as r:
        assert r.hget(f"{settings.redis.key_prefix}paused", "csp-job") is not None
    # The timeline's range submits itself when changed (the handler is in console.js now).
    browser.get(console.url + "/timeline?minutes=60")
    Select(browser.find_element(By.NAME, "minutes")).select_by_value("180")
    until(browser, lambda b: "minutes=180" in b.current_url, "the range to submit itself")
    assert severe(browser) == [], "errors while using the pages"


@contextlib.contextmanager
def attacker_site(html: str) -> Iterator[str]:
    """Another site (another origin: ``localhost`` and a port of its own) serving ``html``."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_another_site_cannot_frame_the_console(browser: WebDriver, settings: AppSettings, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    page = f"<h1>win a prize</h1><iframe id=victim src='{console.url}/' width=800 height=600></iframe>"
    with attacker_site(page) as attacker:
        browser.get(attacker)
        browser.switch_to.frame(browser.find_element(By.ID, "victim"))
        try:
            # The frame ends on a document of its own: Chromium's error page when it refuses to
            # show the console (frame-ancestors 'none', X-Frame-Options DENY), the console otherwise.
            shown = until(browser, lambda b: (b.execute_script("return location.href") or "about:blank") != "about:blank"
                          and b.execute_script("return document.readyState") == "complete"
                          and b.execute_script("return location.href"), "the frame to load")  # fmt: skip
            assert not str(shown).startswith(console.url), "the console was shown inside another site's frame"
            assert not browser.find_elements(By.CSS_SELECTOR, "header.top, form"), "the console rendered in the frame"
        finally:
            browser.switch_to.default_content()
