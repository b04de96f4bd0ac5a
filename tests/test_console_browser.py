"""The console in headless Chromium (Debian's chromium and chromium-driver, via Selenium)
against a running server and a small simulated fleet: every page renders with data and its
charts have points; pausing a rollout from the console pauses it in the API, a viewer cannot;
no console errors, and no request leaves 127.0.0.1. Screenshots are kept as artifacts in
``$EDGEFLEET_ARTIFACTS_DIR/console`` (else pytest's temporary directory);
``EDGEFLEET_UPDATE_SCREENSHOT=1`` also refreshes ``docs/console.png`` for the README."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import _stop, server_config, service_unavailable
from fleet_helpers import FIXTURES, Operator
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver import ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.command import Command
from selenium.webdriver.support.ui import WebDriverWait
from waiting import wait_for

from server.app import ServerHandle, start_server
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
VIEWER = "viewer-" + "v" * 32
DOCS_PNG = Path(__file__).parent.parent / "docs" / "console.png"
PAGES = ("overview", "power", "accuracy", "rollouts", "bandwidth", "devices")


class Console:
    """The server, its simulated fleet and the rollout the pages show."""

    def __init__(self, server: ServerHandle, fleet: FleetThread, rollout: str) -> None:
        self.server, self.fleet, self.rollout = server, fleet, rollout
        self.op = Operator(server.url, server.operator_token)

    def state(self) -> str:
        state: str = self.op.call("GET", f"/api/v1/rollouts/{self.rollout}")["state"]
        return state


def _publish_with_golden_set(op: Operator, release: int) -> None:
    model, npz = FIXTURES / f"digits_int8_r{release}.tflite", FIXTURES / "digits_val.npz"
    with open(model, "rb") as m, open(npz, "rb") as g:
        op.call("POST", "/api/v1/models",
                files={"file": (model.name, m), "golden_set": ("val.npz", g)},
                data={"name": "digits", "release": str(release), "variant": "int8-cpu",
                      "labels": ",".join(str(i) for i in range(10)), "input_range": "0,1",
                      "min_accuracy": "0.9"})


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    work = tmp_path_factory.mktemp("console")
    server = start_server(server_config(work / "server", viewer_token=VIEWER,
                                        rollout_tick_interval_s=0.5, rollup_bucket_s=2))
    op = Operator(server.url, server.operator_token)
    _publish_with_golden_set(op, 1)
    _publish_with_golden_set(op, 2)
    cfg = SimConfig(devices=6, prefix="ui", stores=2, regions=2, poll_s=0.3,
                    telemetry=WindowSpec(window_s=0.5))
    behaviour = build_behaviour(("x86-gateway", "rpi4"), (), seed=3)
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    fleet = FleetThread(lambda: Fleet(server.url, cfg, behaviour, work / "fleet", pinned_root=root))
    try:
        fleet.start(lambda f: f.enroll(server.config.enrollment_tokens[0]))
        op.assign(1, tag="fleet=ui")
        wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 6)
        # A shadow phase first (agreement per class, and the results windows behind the
        # accuracy page), then stage 1 installs and soaks long enough to stay running.
        out = op.call("POST", "/api/v1/rollouts", json={
            "release": "digits@2", "select": ["fleet=ui"], "stages": "50%,100%", "soak": "1h",
            "min_sample": 1, "shadow_every": 1, "min_shadow_agreement": "80%",
            "shadow_min_frames": 20, "shadow_duration": "4s", "max_latency_regression": None,
            "max_power_regression": None, "start": True})
        rollout: str = out["id"]
        wait_for("stage 1 installed", lambda: fleet.report().releases.get("digits@2") == 3,
                 timeout_s=60)
        wait_for("power and accuracy reported", lambda: _has_data(op), timeout_s=60)
        yield Console(server, fleet, rollout)
    finally:
        fleet.stop()
        _stop(server)


def _has_data(op: Operator) -> bool:
    series = op.call("GET", "/api/v1/telemetry/series")["series"]
    releases = op.call("GET", "/api/v1/accuracy")["releases"]
    shadow = op.call("GET", "/api/v1/accuracy")["shadow"]
    return any(p["power_mw"] for s in series for p in s["points"]) and bool(shadow) and any(
        r["golden_set_accuracy"] is not None for r in releases)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("EDGEFLEET_ARTIFACTS_DIR")
    folder = Path(root) / "console" if root else tmp_path_factory.mktemp("console-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _browser() -> WebDriver:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        service_unavailable("Chromium", "apt-get install chromium chromium-driver")
    options = ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = WebDriver(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver = _browser()
    yield driver
    driver.quit()


def log_in(driver: WebDriver, url: str, token: str) -> None:
    driver.get(f"{url}/ui/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "view"))


def show(driver: WebDriver, route: str) -> None:
    """Go to a console route and wait until the page says it rendered it."""
    driver.execute_script(
        "document.body.dataset.rendered = ''; window.location.hash = arguments[0]", f"#/{route}")
    wanted = route.split("?", maxsplit=1)[0]
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-rendered")
        in (wanted, f"error:{wanted}"))
    rendered = driver.find_element(By.TAG_NAME, "body").get_attribute("data-rendered")
    assert rendered == wanted, driver.find_element(By.ID, "view").text


def chart_points(driver: WebDriver) -> dict[str, int]:
    """Points per plotly chart on the page, read from plotly's own data on each chart div."""
    points: dict[str, int] = driver.execute_script("""
        const out = {};
        for (const div of document.querySelectorAll('.chart')) {
          out[div.id] = (div.data || []).reduce((n, t) =>
            n + (t.y || t.values || []).filter((v) => v !== null && v !== undefined).length, 0);
        }
        return out;""")
    return points


def browser_log(driver: WebDriver, kind: str) -> list[dict[str, Any]]:
    """Chrome's ``browser`` or ``performance`` log since the last call (what get_log does)."""
    entries: list[dict[str, Any]] = driver.execute(Command.GET_LOG, {"type": kind})["value"]
    return entries


def requested_urls(driver: WebDriver) -> list[str]:
    urls = []
    for entry in browser_log(driver, "performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_stayed_local(driver: WebDriver, base: str) -> None:
    host = urlsplit(base).netloc
    urls = requested_urls(driver)
    assert urls, "no requests were logged"
    off = [u for u in urls if urlsplit(u).scheme not in ("data", "blob")
           and urlsplit(u).netloc != host]
    assert not off, f"requests left {host}: {off[:5]}"


def console_errors(driver: WebDriver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [e["message"] for e in browser_log(driver, "browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def test_every_page_renders_with_data_and_charts(
    console: Console, browser: WebDriver, artifacts: Path
) -> None:
    url = console.server.url
    log_in(browser, url, console.server.operator_token)
    device = console.fleet.call(lambda f: f.devices[0].device_id)
    expect = {  # charts that must have points on each page
        "overview": ("chart-online", "chart-releases"),
        "power": ("fleet-power_mw", "fleet-mj_per_inference", "fleet-invoke_p95_ms"),
        "accuracy": ("chart-golden", "chart-shadow"),
        "rollouts": (),
        f"rollouts/{console.rollout}": ("chart-stages", "chart-shadow-classes"),
        "bandwidth": ("chart-bytes", "chart-cost"),
        "devices": (),
        f"devices/{device}": ("device-power_mw", "device-invoke_p95_ms"),
    }
    for route, charts in expect.items():
        show(browser, route)
        text = browser.find_element(By.ID, "view").text
        assert "nothing yet" not in text.split("Shadow evaluation")[0] or route == "accuracy", route
        points = chart_points(browser)
        for chart in charts:
            assert points.get(chart, 0) > 0, (route, chart, points)
        name = route.replace("/", "-")
        browser.save_screenshot(str(artifacts / f"{name}.png"))
    show(browser, f"rollouts/{console.rollout}")
    gates = browser.find_element(By.ID, "view").text
    assert "error_threshold" in gates and "<= limit" in gates  # each gate: value and limit
    show(browser, "overview")
    assert "ui-r0" in browser.find_element(By.ID, "view").text  # a region tag
    _keep_readme_screenshot(browser, artifacts)
    browser.get(f"{url}/docs")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    browser.save_screenshot(str(artifacts / "docs.png"))
    assert console_errors(browser) == []
    assert_stayed_local(browser, url)


def _keep_readme_screenshot(browser: WebDriver, artifacts: Path) -> None:
    browser.set_window_size(1280, 860)
    show(browser, "rollouts")  # and back: the charts are drawn at the new size
    show(browser, "overview")
    shot = artifacts / "readme-overview.png"
    browser.save_screenshot(str(shot))
    browser.set_window_size(1400, 1000)
    if os.environ.get("EDGEFLEET_UPDATE_SCREENSHOT") == "1":
        from PIL import Image  # noqa: PLC0415 - only when refreshing the README image

        with Image.open(shot) as image:  # a palette PNG keeps the repository small
            image.convert("RGB").quantize(colors=128).save(DOCS_PNG, optimize=True)
    elif not DOCS_PNG.exists():
        shutil.copyfile(shot, DOCS_PNG)


def test_an_operator_pauses_from_the_console_and_a_viewer_cannot(
    console: Console, browser: WebDriver, artifacts: Path
) -> None:
    url, rollout = console.server.url, console.rollout
    wait_for("the rollout running", lambda: console.state() == "running")
    log_in(browser, url, console.server.operator_token)
    show(browser, f"rollouts/{rollout}")
    browser.find_element(By.CSS_SELECTOR, "button[data-action=pause]").click()
    WebDriverWait(browser, 30).until(
        lambda d: "now paused" in d.find_element(By.ID, "action-result").text)
    assert console.state() == "paused"
    show(browser, f"rollouts/{rollout}")
    browser.save_screenshot(str(artifacts / "rollout-paused.png"))
    browser.find_element(By.CSS_SELECTOR, "button[data-action=resume]").click()
    WebDriverWait(browser, 30).until(
        lambda d: "now running" in d.find_element(By.ID, "action-result").text)
    assert console.state() == "running"
    assert console_errors(browser) == []
    assert_stayed_local(browser, url)

    viewer = _browser()
    try:
        log_in(viewer, url, VIEWER)
        show(viewer, f"rollouts/{rollout}")
        assert viewer.find_elements(By.CSS_SELECTOR, "#actions button") == []  # hidden
        # Even with the page's own CSRF token, the server refuses a viewer's action.
        status = viewer.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            fetch(arguments[0], {method: 'POST', credentials: 'same-origin',
                                 headers: {'X-CSRF-Token': csrf}})
              .then((r) => r.json().then((b) => done([r.status, b.error])));""",
            f"/api/v1/rollouts/{rollout}/pause")
        assert status[0] == 403 and "viewer" in status[1]
        assert console.state() == "running"
        viewer.save_screenshot(str(artifacts / "rollout-viewer.png"))
        assert console_errors(viewer, allowed=("status of 403",)) == []
        assert_stayed_local(viewer, url)
    finally:
        viewer.quit()
