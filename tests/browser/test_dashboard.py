"""The web dashboard in Debian's headless Chromium (Playwright, no downloaded browser):
sign in with a viewer token, see the fleet and a latency chart drawn from real
ingested telemetry, and leave a screenshot in ``test-artifacts/dashboard.png``."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from cloud.ingest.testing import FakeDevice, publish_synthetic_release
from cloud.tuf_repo import ReleaseRepository
from shared.messages import encode
from shared.topics import Channel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _feed(port: int, devices: list[FakeDevice], rounds: int) -> None:
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"browser-test-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for d in devices:
            c.publish(d.topic(Channel.STATUS), d.status(), qos=1, retain=True).wait_for_publish(10)
            c.publish(d.topic(Channel.REPORTED), d.reported(), qos=1, retain=True).wait_for_publish(
                10
            )
        time.sleep(0.5)
        for r in range(rounds):
            for i, d in enumerate(devices):
                msg = d.telemetry(samples=400, latency_ms=0.4 + 0.2 * i + 0.05 * r, errors=r % 2)
                c.publish(d.topic(Channel.TELEMETRY), encode(msg), qos=1).wait_for_publish(10)
            time.sleep(0.2)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_dashboard_shows_fleet_and_charts(cloud) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    s = cloud.settings
    rel = publish_synthetic_release(
        ReleaseRepository.open(s.repo_dir, s.keys_dir), model="digits", n_features=8, n_classes=4
    )
    devices = [FakeDevice(f"dev-{i:03d}", release=rel, seed=i) for i in range(1, 4)]
    _feed(s.broker_port, devices, rounds=5)

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{cloud.url}/dashboard/?interval=700")

            # Signing in with a bad token is refused and asks again.
            page.fill("#token", "efk_wrong")
            page.click("#login-form button")
            expect(page.locator("#login-error")).to_contain_text("refused")
            errors.clear()  # the 401 itself is logged by the browser

            page.fill("#token", cloud.tokens["viewer"])
            page.click("#login-form button")
            for d in devices:
                expect(page.locator(f'#fleet tr[data-device="{d.device_id}"]')).to_contain_text(
                    "online"
                )
            expect(page.locator("#latency-chart path.series").first).to_be_attached()
            assert int(page.locator("#latency-chart").get_attribute("data-points") or 0) > 0
            expect(page.locator("#releases tbody tr")).to_have_count(1)
            expect(page.locator("#t-online")).to_have_text("3 / 3")
            expect(page.locator("#status")).to_contain_text("live")
            # Live updates: new telemetry shows up without a reload.
            before = page.locator('#fleet tr[data-device="dev-001"] td').nth(7).inner_text()
            _feed(s.broker_port, devices[:1], rounds=2)
            expect(page.locator('#fleet tr[data-device="dev-001"] td').nth(7)).not_to_have_text(
                before, timeout=15_000
            )
            # A rollout appears live, with its waves.
            expect(page.locator("#rollouts-empty")).to_be_visible()
            publish_synthetic_release(
                ReleaseRepository.open(s.repo_dir, s.keys_dir), model="digits", release=2
            )
            r = httpx.post(
                f"{cloud.url}/api/v1/rollouts",
                headers=cloud.headers("operator"),
                json={"model": "digits", "release": 2, "target": {"all": True}, "waves": [30, 100]},
                timeout=30,
            )
            assert r.status_code == 201, r.text
            row = page.locator(f'#rollouts tr[data-rollout="{r.json()["id"]}"]')
            expect(row).to_contain_text("running")
            expect(row).to_contain_text("1: 0/1")  # wave 1: one device offered, none there
            expect(row).to_contain_text("0 / 3")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == [], errors
            # The token lives in this tab's sessionStorage only, never in a cookie.
            assert page.context.cookies() == []
            page.click("#logout")
            expect(page.locator("#login")).to_be_visible()
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
