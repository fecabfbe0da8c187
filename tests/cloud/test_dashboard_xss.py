"""Red team: markup in what devices write (labels, model names and versions, the
circuit state) reaches the dashboard as text, never as HTML, in a real chromium."""

from __future__ import annotations

import json
import uuid

from common import messages, topics
from common.mqtt import MqttLink
from tests.cloud.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip
from tests.edge.agent_harness import ControlPlane

XSS = '<img src=x onerror="window.pwned=1">'


async def test_markup_from_a_device_is_shown_as_text_and_never_runs(mosquitto, tmp_path) -> None:
    playwright_api = _browser_or_skip()
    device = f"evil-{uuid.uuid4().hex[:6]}"
    status = json.loads(messages.status(device, True))
    status["labels"] = {"site": XSS}
    status["models"] = [{"name": XSS, "version": "<b>1</b>"}]
    telemetry = {"model": "toy", "router": {"requests": 1, "circuit": f'x" onclick="{XSS}'}}
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with MqttLink(client_id=device, host=mosquitto.host, port=mosquitto.port) as dev:
            await dev.wait_connected(10)
            await dev.publish(topics.device_topic(device, "status"), json.dumps(status).encode())
            await cp.wait_online([device])
            await dev.publish(
                topics.device_topic(device, "telemetry"), json.dumps(telemetry).encode()
            )
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(f"{cp.url}/#token={cp.tokens['viewer']}")
                row = page.locator("#devices tbody tr", has_text=device)
                await row.wait_for(timeout=15000)
                text = await row.inner_text()
                assert XSS in text and "<b>1</b>" in text, text  # shown literally
                assert await page.locator("#devices img, #versions img").count() == 0
                assert await page.evaluate("window.pwned") is None
                assert "token" not in page.url  # the fragment is gone from the address bar
            finally:
                await browser.close()
