"""The console: signed-in pages only, CSRF on every form, and what the person on call sees."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import submit
from tests.stack import RELAY_KEY, Receiver, Stack, eventually, relay_stack


def sign_in(stack: Stack, key: str = RELAY_KEY) -> httpx.Client:
    client = httpx.Client(base_url=stack.api_url, follow_redirects=False)
    form = client.get("/console/login")
    token = re.search(r'name="token" value="([^"]+)"', form.text)
    assert token is not None
    answer = client.post("/console/login", data={"key": key, "token": token.group(1)})
    assert answer.status_code == 303, answer.text
    return client


OPEN: list[httpx.Client] = []


def stack_client(stack: Stack, client: httpx.Client) -> httpx.Client:
    """Closed after the test (see the autouse fixture), so no socket is left behind."""
    OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize(
    "path",
    [
        "/console/",
        "/console/jobs",
        "/console/jobs/x",
        "/console/deliveries/failed",
        "/console/chart.svg",
    ],
)
def test_nothing_is_reachable_without_signing_in(redis_url: str, path: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = httpx.get(stack.api_url + path)
        assert answer.status_code == 303
        assert answer.headers["location"].endswith("/console/login")


def test_the_session_cookie_is_signed_httponly_strict_and_holds_no_key(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack_client(stack, sign_in(stack))
        [cookie] = [value for name, value in client.cookies.items() if name == "relay_console"]
        assert RELAY_KEY not in cookie
        raw = httpx.get(stack.api_url + "/console/login")
        set_cookie = raw.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "secure" not in set_cookie  # plain http here; Secure is set over https
        page = client.get("/console/")
        assert page.status_code == 200 and "<h1>Overview</h1>" in page.text
        assert RELAY_KEY not in page.text
        # A tampered cookie is no session.
        forged = httpx.get(
            stack.api_url + "/console/", cookies={"relay_console": cookie[:-2] + "xx"}
        )
        assert forged.status_code == 303


def test_a_wrong_key_is_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack_client(stack, httpx.Client(base_url=stack.api_url))
        form = client.get("/console/login")
        token = re.search(r'name="token" value="([^"]+)"', form.text)
        assert token is not None
        answer = client.post("/console/login", data={"key": "wrong-key", "token": token.group(1)})
        assert answer.status_code == 401
        assert "not one of RELAY_API_KEYS" in answer.text
        assert "wrong-key" not in answer.text
        assert "relay_console=" not in answer.headers.get("set-cookie", "")


def test_sign_in_without_the_form_token_is_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = httpx.post(
            stack.api_url + "/console/login", data={"key": RELAY_KEY, "token": "made-up"}
        )
        assert answer.status_code == 403
        assert "relay_console=" not in answer.headers.get("set-cookie", "")


def test_a_forged_post_without_the_csrf_token_is_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack_client(stack, sign_in(stack))
        assert client.post("/console/logout", data={}).status_code == 403
        assert client.post("/console/logout", data={"csrf": "guess"}).status_code == 403
        assert client.get("/console/").status_code == 200  # still signed in
        token = csrf_of(client.get("/console/").text)
        out = client.post("/console/logout", data={"csrf": token})
        assert out.status_code == 303
        client.cookies.clear()
        assert client.get("/console/").status_code == 303


def test_find_a_job_by_reference_id_and_open_it(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, reference_id="episode-42-ja")
        stack.receiver.wait_for(1)
        client = stack_client(stack, sign_in(stack))
        found = client.get("/console/jobs", params={"q": "episode-42-ja"})
        assert request_id in found.text
        page = client.get(f"/console/jobs/{request_id}")
        assert page.status_code == 200
        assert "completed" in page.text and "delivered" in page.text
        listed = client.get("/console/jobs", params={"delivery": "delivered"})
        assert request_id in listed.text
        assert request_id not in client.get("/console/deliveries/failed").text
        overview = client.get("/console/")
        assert "1 delivered" in overview.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/jobs/no-such-job", 404),
        ("/console/jobs?cursor=abc", 400),
        ("/console/jobs?delivery=sideways", 400),
    ],
)
def test_bad_requests_get_a_page_that_says_so(redis_url: str, path: str, status: int) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack_client(stack, sign_in(stack))
        answer = client.get(path)
        assert answer.status_code == status
        assert "<h1>Something is not right</h1>" in answer.text


def test_redeliver_needs_the_csrf_token_and_a_confirmation(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack)
        stack.receiver.wait_for(1)
        client = stack_client(stack, sign_in(stack))
        page = client.get(f"/console/jobs/{request_id}")
        token = csrf_of(page.text)
        url = f"/console/jobs/{request_id}/redeliver"
        assert f'action="{stack.api_url}{url}"' in page.text
        assert client.post(url, data={"confirm": "yes"}).status_code == 403
        assert client.post(url, data={"csrf": token}).status_code == 400
        assert len(stack.receiver.received) == 1
        done = client.post(url, data={"csrf": token, "confirm": "yes"})
        assert done.status_code == 303 and "redelivered=" in done.headers["location"]
        stack.receiver.wait_for(2)


def test_recover_from_the_failed_deliveries_page(redis_url: str) -> None:
    receiver = Receiver(script=[500, 500])
    with relay_stack(
        redis_url, receiver=receiver, env={"RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2"}
    ) as stack:
        request_id = submit(stack)
        receiver.wait_for(2)
        client = stack_client(stack, sign_in(stack))
        failed = eventually(
            lambda: request_id in (text := client.get("/console/deliveries/failed").text) and text
        )
        token = csrf_of(failed)
        assert f'action="{stack.api_url}/console/deliveries/recover"' in failed
        assert (
            client.post("/console/deliveries/recover", data={"since": "2020-01-01"}).status_code
            == 403
        )
        bad = client.post("/console/deliveries/recover", data={"csrf": token, "since": "soon"})
        assert bad.status_code == 400
        done = client.post(
            "/console/deliveries/recover",
            data={"csrf": token, "since": "2020-01-01T00:00:00Z", "limit": "10"},
        )
        assert done.status_code == 200 and "Requeued 1 deliveries" in done.text
        receiver.wait_for(3)
