"""The studio for everyone, in headless Chromium: axe-core finds no critical or serious violations, every
control has a name, a 390 px phone screen needs no sideways scrolling and shows the output first; and the
API docs (/docs) render with the network off.

axe-core (MPL-2.0) comes from the `axe-playwright-python` package (a dev dependency that ships
`axe.min.js`): it is read from disk and injected, nothing is fetched at test time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from server.harness import ServerProcess
from studio.drivers import PlaywrightDriver

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}


def axe_source() -> str:
    return resources.files("axe_playwright_python").joinpath("axe.min.js").read_text(encoding="utf-8")


def open_studio(driver: PlaywrightDriver, server: ServerProcess) -> None:
    driver.goto(server.url)
    driver.page.wait_for_function("document.getElementById('model-state').textContent === 'ready'")
    # Show the parts that are hidden until used, so they are checked too: the segment editor (a timeline
    # segment selected) and the advanced settings.
    driver.page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    driver.page.click("#timeline-new")
    box = driver.page.locator("#timeline-track").bounding_box()
    assert box is not None
    driver.page.mouse.click(box["x"] + 5, box["y"] + box["height"] / 2)
    driver.page.wait_for_selector("#segment-editor:not([hidden])")


def axe_violations(driver: PlaywrightDriver) -> list[dict[str, Any]]:
    driver.page.evaluate(axe_source())
    result = driver.page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations.map(v => ({"
        "id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}))"
    )
    return result


def test_no_critical_or_serious_axe_violations(
    chromium: PlaywrightDriver, server: ServerProcess, artifacts: Path
) -> None:
    open_studio(chromium, server)
    violations = axe_violations(chromium)
    (artifacts / "axe-violations.txt").write_text(
        "\n".join(f"{v['impact']}: {v['id']} ({v['help']}): {v['nodes']}" for v in violations) + "\n"
    )
    bad = [v for v in violations if v["impact"] in ("critical", "serious")]
    assert bad == [], bad
    assert [v["id"] for v in violations if v["id"] in ("region", "label", "select-name", "button-name")] == []


def test_every_control_has_a_name_that_says_what_it_does(
    chromium: PlaywrightDriver, server: ServerProcess
) -> None:
    open_studio(chromium, server)
    page = chromium.page
    names = {
        "#transition-method": "Transition method",
        "#steps-preset": "Step presets",
        "#segment-method": "Segment transition method",
        "#noise-scale": "Noise scale",
        "#width": "Width",
        "#height": "Height",
    }
    for selector, name in names.items():
        assert page.locator(selector).get_attribute("aria-label") == name, selector
        assert page.get_by_label(name, exact=True).count() == 1, name
    # Every button, select, input and textarea that is shown has an accessible name, and no button is
    # named only by a symbol such as "✕".
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, select, input, textarea')]
          .filter(n => n.offsetParent !== null && n.type !== 'hidden')
          .filter(n => {
            const label = n.getAttribute('aria-label') || (n.labels && [...n.labels].map(l => l.textContent).join(' '))
              || n.textContent;
            return !label || !/[A-Za-z]/.test(label);
          })
          .map(n => n.id || n.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
    removes = page.locator("#segment-prompts button")
    assert removes.count() >= 1
    assert removes.first.get_attribute("aria-label") == "remove segment prompt 1"


def test_a_390px_phone_screen_has_no_sideways_scroll_and_the_output_first(
    chromium: PlaywrightDriver, server: ServerProcess, artifacts: Path
) -> None:
    page = chromium.page
    page.set_viewport_size(PHONE)
    open_studio(chromium, server)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth]")
    assert max(widths) <= PHONE["width"], widths
    for button in ("#start", "#pause", "#reset", "#help-button"):
        box = page.locator(button).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (button, box)
    stage = page.locator("#stage").bounding_box()
    inputs = page.locator("#input-panel").bounding_box()
    assert stage is not None and inputs is not None
    assert stage["y"] < inputs["y"], "the output video comes before the input panel"
    chromium.screenshot(artifacts / "studio-390px.png")


def test_the_api_docs_render_with_the_network_off(chromium: PlaywrightDriver, server: ServerProcess) -> None:
    page = chromium.page
    refused: list[str] = []

    def loopback_only(route: Any) -> None:
        host = route.request.url.split("/")[2].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "[::1]", "localhost"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert page.locator(".swagger-ui .title").first.inner_text().startswith("wanstream")
    assert page.locator(".opblock").count() > 10  # every route is listed
    assert refused == [], refused
