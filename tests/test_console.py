"""The console: signed-in pages only, CSRF on every form, and what the person on call sees."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import httpx
import pytest

from relay.errors import ConfigError
from relay.settings import load_settings
from tests.helpers import closed_after_test, csrf_of, sign_in, submit
from tests.stack import RELAY_KEY, Receiver, Stack, eventually, relay_stack


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
        client = sign_in(stack)
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
        client = closed_after_test(httpx.Client(base_url=stack.api_url))
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
        client = sign_in(stack)
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
        client = sign_in(stack)
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
        client = sign_in(stack)
        answer = client.get(path)
        assert answer.status_code == status
        assert "<h1>Something is not right</h1>" in answer.text


def test_redeliver_needs_the_csrf_token_and_a_confirmation(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack)
        stack.receiver.wait_for(1)
        client = sign_in(stack)
        page = client.get(f"/console/jobs/{request_id}")
        token = csrf_of(page.text)
        url = f"/console/jobs/{request_id}/redeliver"
        assert f'action="{url}"' in page.text
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
        client = sign_in(stack)
        failed = eventually(
            lambda: request_id in (text := client.get("/console/deliveries/failed").text) and text
        )
        token = csrf_of(failed)
        assert 'action="/console/deliveries/recover"' in failed
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


# A TLS-terminating proxy (the chart's Ingress) in front of the API, as the API sees it: another
# address than loopback's 127.0.0.1, which uvicorn trusts by default.
PROXY = "127.0.0.2"
FORWARDED = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.9"}


def through_proxy(stack: Stack) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=PROXY)
    client = httpx.Client(base_url=stack.api_url, transport=transport, headers=FORWARDED)
    return closed_after_test(client)


def set_cookies(answer: httpx.Response) -> dict[str, str]:
    """Each cookie the answer sets, by name: its whole Set-Cookie line."""
    found = {}
    for line in answer.headers.get_list("set-cookie"):
        [name] = SimpleCookie(line).keys()
        found[name] = line
    return found


def cookie_value(line: str) -> str:
    [morsel] = SimpleCookie(line).values()
    return morsel.value


def sign_in_by_hand(client: httpx.Client) -> tuple[httpx.Response, httpx.Response]:
    """The login page and the sign-in answer; cookies passed on by hand, as a browser on https
    would (httpx keeps Secure cookies for https URLs)."""
    form = client.get("/console/login")
    token = re.search(r'name="token" value="([^"]+)"', form.text)
    assert token is not None
    login_cookie = cookie_value(form.headers["set-cookie"])
    answer = client.post(
        "/console/login",
        data={"key": RELAY_KEY, "token": token.group(1)},
        headers={"cookie": f"relay_console_login={login_cookie}"},
    )
    assert answer.status_code == 303, answer.text
    return form, answer


def test_behind_a_tls_proxy_redirects_and_links_keep_the_browsers_scheme(redis_url: str) -> None:
    # Finding 6 of #24: behind the Ingress, sign-in redirected to http://…/console/.
    with relay_stack(redis_url, workers=0) as stack:
        form, answer = sign_in_by_hand(through_proxy(stack))
        assert answer.headers["location"] == "/console/"
        assert 'action="/console/login"' in form.text
        assert 'href="/console/static/console.css"' in form.text
        session = cookie_value(set_cookies(answer)["relay_console"])
        page = httpx.get(stack.api_url + "/console/", cookies={"relay_console": session})
        assert 'href="/console/jobs"' in page.text and 'action="/console/logout"' in page.text
        assert stack.api_url not in page.text  # no absolute link back to plain http


def test_behind_a_trusted_tls_proxy_every_cookie_is_secure(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_FORWARDED_ALLOW_IPS": PROXY}) as stack:
        form, answer = sign_in_by_hand(through_proxy(stack))
        assert "; secure" in set_cookies(form)["relay_console_login"].lower()
        assert "; secure" in set_cookies(answer)["relay_console"].lower()


def test_secure_cookies_can_be_required_whatever_the_scheme(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_CONSOLE_SECURE_COOKIES": "true"}) as stack:
        form, answer = sign_in_by_hand(closed_after_test(httpx.Client(base_url=stack.api_url)))
        assert "; secure" in set_cookies(form)["relay_console_login"].lower()
        assert "; secure" in set_cookies(answer)["relay_console"].lower()


def test_a_session_cookie_copied_before_sign_out_is_dead_after_it(redis_url: str) -> None:
    # Finding 6 of #24: a cookie copied before logout still worked for its 8 hours.
    with relay_stack(redis_url, workers=0) as stack:
        client = sign_in(stack)
        copied = client.cookies["relay_console"]
        elsewhere = {"relay_console": copied}
        assert httpx.get(stack.api_url + "/console/", cookies=elsewhere).status_code == 200
        token = csrf_of(client.get("/console/").text)
        assert client.post("/console/logout", data={"csrf": token}).status_code == 303
        after = httpx.get(stack.api_url + "/console/", cookies=elsewhere)
        assert after.status_code == 303
        assert after.headers["location"] == "/console/login"
        # Signing in again makes a new session; the old one stays dead.
        again = sign_in(stack)
        assert again.cookies["relay_console"] != copied
        assert httpx.get(stack.api_url + "/console/", cookies=elsewhere).status_code == 303


FRAMING_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@pytest.mark.parametrize(
    "path",
    [
        "/console/login",
        "/console/",
        "/console/jobs/no-such-job",
        "/console/static/console.css",
        "/console/deliveries/failed",
    ],
)
def test_no_console_answer_may_be_framed(redis_url: str, path: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        for client in (httpx.Client(base_url=stack.api_url), sign_in(stack)):
            answer = closed_after_test(client).get(path)
            got = {name: answer.headers.get(name) for name in FRAMING_HEADERS}
            assert got == FRAMING_HEADERS, (path, answer.status_code)
            policy = answer.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy
            assert "default-src 'self'" in policy


@pytest.mark.parametrize("value", ["10.0.0.1/8", "ingress-nginx", "10.0.0.0/8,*", "300.1.1.1"])
def test_a_trusted_proxy_uvicorn_would_never_match_stops_start_up(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(RELAY_FORWARDED_ALLOW_IPS=value)
    assert caught.value.variable == "RELAY_FORWARDED_ALLOW_IPS"


@pytest.mark.parametrize("value", ["*", "10.244.0.0/16, 192.168.1.5", "::1,fd00::/8"])
def test_trusted_proxies_are_addresses_networks_or_a_star(value: str) -> None:
    assert load_settings(RELAY_FORWARDED_ALLOW_IPS=value).forwarded_allow_ips == value
