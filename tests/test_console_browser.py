"""The console in a real browser: Debian's Chromium driven by Playwright (.ci/run installs it).

Each page's screenshot is saved under the test's tmp dir (pytest prints where on failure).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.helpers import ADMIN_KEY, B_KEY, submit, submit_as, three_callers, verified
from tests.servers import serve
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)
# Background networking off: this machine's network is closed, and the browser must not wait on it.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def sign_in(page: Page, stack: Stack, key: str = RELAY_KEY) -> None:
    page.goto(stack.api_url + "/console/")
    expect(page).to_have_url(stack.api_url + "/console/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_find_a_job_and_open_it(redis_url: str, browser: Browser, tmp_path: Path) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, reference_id="episode-42-ja")
        stack.receiver.wait_for(1)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # The console's Content-Security-Policy refuses nothing the console itself uses.
        refused: list[str] = []
        page.on("console", lambda message: refused.append(message.text))
        sign_in(page, stack)
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        expect(page.locator("#callbacks + p")).to_contain_text("1 delivered, 0 failed")
        page.screenshot(path=tmp_path / "overview.png", full_page=True)

        page.get_by_role("link", name="Jobs", exact=True).click()
        page.get_by_label("Request id or reference_id").fill("episode-42-ja")
        page.get_by_role("button", name="Find").click()
        page.get_by_role("link", name=request_id).click()
        expect(page.get_by_role("heading", level=1)).to_contain_text(request_id)
        expect(page.locator("pre.json")).to_contain_text('"status": "completed"')
        # The status timeline, from the relay taking the job on to its end.
        timeline = page.locator("ol.timeline li")
        expect(timeline.first).to_contain_text("submitted")
        expect(timeline.last).to_contain_text("completed")
        # Local time shown, UTC on hover.
        submitted = page.locator("time").first
        assert (submitted.get_attribute("title") or "").endswith("(UTC)")

        # Redeliver: confirmed, queued, made; the receiver gets the same event again.
        page.get_by_label("Yes, send the final event again").check()
        page.get_by_role("button", name="Redeliver").click()
        expect(page.get_by_role("status")).to_contain_text("Redelivery queued")
        first, second = stack.receiver.wait_for(2)
        assert verified(stack, second) == verified(stack, first)
        assert second.headers["webhook-id"] == first.headers["webhook-id"]

        def attempt_rows() -> int:
            page.reload()
            return page.locator("table.attempts tbody tr").count()

        eventually(lambda: attempt_rows() == 3)
        expect(page.locator("table.attempts tbody tr").last).to_contain_text("delivered")
        expect(page.locator("table.attempts tbody tr").nth(1)).to_contain_text(
            "redelivery requested"
        )
        page.screenshot(path=tmp_path / "job.png", full_page=True)
        assert not [text for text in refused if "Content Security Policy" in text], refused

        # A phone-sized screen still reads.
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        sign_in(phone, stack)
        phone.goto(stack.api_url + f"/console/jobs/{request_id}")
        expect(phone.get_by_role("heading", level=1)).to_be_visible()
        phone.screenshot(path=tmp_path / "job-phone.png", full_page=True)

        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(stack.api_url + "/console/login")
        page.goto(stack.api_url + "/console/")
        expect(page).to_have_url(stack.api_url + "/console/login")


def test_a_wrong_key_is_refused_in_the_browser(
    redis_url: str, browser: Browser, tmp_path: Path
) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        page = browser.new_page()
        sign_in(page, stack, key="not-a-relay-key")
        expect(page.get_by_role("alert")).to_contain_text("not one of RELAY_API_KEYS")
        page.screenshot(path=tmp_path / "refused.png")
        page.goto(stack.api_url + "/console/")
        expect(page).to_have_url(stack.api_url + "/console/login")


def test_a_forged_post_from_the_page_is_refused(redis_url: str, browser: Browser) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        page = browser.new_page()
        sign_in(page, stack)
        status = page.evaluate(
            """async () => (await fetch('/console/logout', {method: 'POST',
                 headers: {'content-type': 'application/x-www-form-urlencoded'},
                 body: 'csrf=forged'})).status"""
        )
        assert status == 403
        page.goto(stack.api_url + "/console/")
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()


def framing_site(target: str) -> Starlette:
    """Another site, whose page puts `target` in a frame (clickjacking)."""

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(f'<h1>Win a prize</h1><iframe src="{target}"></iframe>')

    return Starlette(routes=[Route("/", page)])


def test_another_site_cannot_frame_the_console(redis_url: str, browser: Browser) -> None:
    # Finding 6 of #24: no frame-ancestors / X-Frame-Options on console pages.
    with (
        relay_stack(redis_url, workers=0) as stack,
        serve(framing_site(stack.api_url + "/console/login")) as site,
    ):
        page = browser.new_page()
        refused: list[str] = []
        page.on("console", lambda message: refused.append(message.text))
        page.goto(site)
        expect(page.get_by_role("heading", name="Win a prize")).to_be_visible()
        # The frame is not the console's: the browser refused to render it there.
        eventually(lambda: any("frame-ancestors" in text for text in refused))
        expect(page.frame_locator("iframe").get_by_label("API key")).to_have_count(0)


def test_a_session_copied_before_sign_out_is_dead_after_it(
    redis_url: str, browser: Browser
) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        mine = browser.new_context()
        page = mine.new_page()
        sign_in(page, stack)
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        thief = browser.new_context()
        thief.add_cookies(
            [
                {"name": c["name"], "value": c["value"], "domain": c["domain"], "path": c["path"]}
                for c in mine.cookies()
            ]
        )
        stolen = thief.new_page()
        stolen.goto(stack.api_url + "/console/")
        expect(stolen.get_by_role("heading", name="Overview", level=1)).to_be_visible()

        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(stack.api_url + "/console/login")
        stolen.goto(stack.api_url + "/console/")
        expect(stolen).to_have_url(stack.api_url + "/console/login")
        mine.close()
        thief.close()


def test_secure_cookies_still_sign_in_over_a_port_forward(redis_url: str, browser: Browser) -> None:
    # The chart requires Secure cookies behind its TLS Ingress; `kubectl port-forward` serves
    # plain http on 127.0.0.1, which browsers hold to be secure enough for them.
    env = {"RELAY_CONSOLE_SECURE_COOKIES": "true"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        page = browser.new_page()
        sign_in(page, stack)
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        assert all(cookie["secure"] for cookie in page.context.cookies())


def test_a_caller_sees_its_own_jobs_and_an_admin_every_callers(
    redis_url: str, browser: Browser, tmp_path: Path
) -> None:
    # Callers as tenants (#20): team-a's key shows team-a's jobs only; the admin's shows both,
    # with a caller column and a caller filter.
    env = three_callers(tmp_path / "callers.json")
    with relay_stack(redis_url, env=env) as stack:
        a_job = submit_as(stack, RELAY_KEY, "a-episode-1")
        b_job = submit_as(stack, B_KEY, "b-episode-1")
        stack.receiver.wait_for(2)

        caller = browser.new_context(viewport={"width": 1280, "height": 900})
        page = caller.new_page()
        sign_in(page, stack, RELAY_KEY)
        expect(page.locator("header .viewer")).to_have_text("team-a")
        page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
        expect(page.get_by_role("link", name=a_job)).to_be_visible()
        expect(page.get_by_role("link", name=b_job)).to_have_count(0)
        expect(page.get_by_role("columnheader", name="Caller")).to_have_count(0)
        expect(page.get_by_label("Caller")).to_have_count(0)
        page.screenshot(path=tmp_path / "caller-jobs.png", full_page=True)
        page.goto(stack.api_url + f"/console/jobs/{b_job}")
        expect(page.get_by_role("heading", level=1)).to_have_text("Something is not right")
        caller.close()

        admin = browser.new_context(viewport={"width": 1280, "height": 900})
        page = admin.new_page()
        sign_in(page, stack, ADMIN_KEY)
        expect(page.locator("header .viewer")).to_contain_text("oncall (admin")
        page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
        expect(page.get_by_role("link", name=a_job)).to_be_visible()
        expect(page.get_by_role("link", name=b_job)).to_be_visible()
        expect(page.get_by_role("columnheader", name="Caller")).to_be_visible()
        b_row = page.get_by_role("row").filter(has=page.get_by_role("link", name=b_job))
        expect(b_row).to_contain_text("team-b")
        page.screenshot(path=tmp_path / "admin-jobs.png", full_page=True)
        page.get_by_label("Caller").select_option("team-b")
        page.get_by_role("button", name="Find").click()
        expect(page.get_by_role("link", name=b_job)).to_be_visible()
        expect(page.get_by_role("link", name=a_job)).to_have_count(0)
        page.screenshot(path=tmp_path / "admin-jobs-team-b.png", full_page=True)
        admin.close()
