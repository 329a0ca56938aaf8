"""The callback network policy: URL syntax, address ranges, spellings, and resolution."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import httpx
import pytest
import yarl
from aiohttp.helpers import is_ip_address
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.delivery.netpolicy import (
    DEFAULT_DENIED_NETWORKS,
    METADATA_NETWORKS,
    IPAddress,
    IPNetwork,
    NetworkPolicy,
    ParsedCallbackUrl,
    parse_callback_url,
    resolve_and_check,
)
from relay.errors import ApiError, CallbackUrlRejected
from relay.settings import parse_networks, parse_ports

DEFAULT = NetworkPolicy()
ALLOW_LOOPBACK = NetworkPolicy.from_strings("127.0.0.0/8", "")


def reason_for(url: str) -> str:
    with pytest.raises(CallbackUrlRejected) as caught:
        parse_callback_url(url)
    return caught.value.reason


def refused(url: str, policy: NetworkPolicy = DEFAULT) -> bool:
    """True when a literal-IP URL is refused by its syntax or by `policy`."""
    try:
        parsed = parse_callback_url(url)
    except CallbackUrlRejected:
        return True
    assert parsed.ip is not None, url
    return policy.check_address(parsed.ip) is not None


# --- URL syntax -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://receiver.ns.svc:8080/hook", "http://receiver.ns.svc:8080/hook"),
        ("HTTPS://Receiver.Example.COM/a?b=c#d", "https://receiver.example.com/a?b=c#d"),
        ("http://receiver", "http://receiver/"),
        ("http://example.com./x", "http://example.com./x"),
        ("http://ex.com:0080/", "http://ex.com:80/"),
        ("http://bücher.de/", "http://xn--bcher-kva.de/"),
        ("http://BÜCHER.de/", "http://xn--bcher-kva.de/"),
        ("http://foo_bar.ns.svc/", "http://foo_bar.ns.svc/"),
        ("http://10.0.0.1:9000/h", "http://10.0.0.1:9000/h"),
        ("http://[::FFFF:127.0.0.1]/", "http://[::ffff:7f00:1]/"),
        ("http://[FD12:0:0::1]:81/", "http://[fd12::1]:81/"),
        ("http://receiver/path/ünïcode?q=ä", "http://receiver/path/ünïcode?q=ä"),
    ],
)
def test_accepted_urls_are_normalised(url: str, expected: str) -> None:
    assert parse_callback_url(url).url == expected


def test_parsed_fields() -> None:
    assert parse_callback_url("https://Receiver.ns/x") == ParsedCallbackUrl(
        url="https://receiver.ns/x", scheme="https", host="receiver.ns", port=443, ip=None
    )
    literal = parse_callback_url("http://[fd00::1]:8080/")
    assert (literal.host, literal.port, literal.ip) == ("fd00::1", 8080, IPv6Address("fd00::1"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://receiver/", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://receiver/", "scheme 'gopher'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("receiver/hook", "not an absolute"),
        ("//receiver/hook", "not an absolute"),
        ("http:receiver/hook", "not an absolute"),
        ("http:/receiver/hook", "not an absolute"),
        ("http:///hook", "has no host"),
        ("http://:80/", "has no host"),
        ("http://user:pw@receiver/", "credentials"),
        ("http://user@receiver/", "credentials"),
        ("http://a@b@c/", "credentials"),
        ("http://receiver:/", "empty port"),
        ("http://receiver:0/", "port '0'"),
        ("http://receiver:65536/", "port '65536'"),
        ("http://receiver:\uff18\uff10/", "port"),
        ("http://receiver:80:81/", "more than one port"),
        ("http://::1/", "outside brackets"),
        ("http://[::1/", "unterminated"),
        ("http://[::1]x/", "after its IPv6 literal"),
        ("http://[fe80::1%25eth0]/", "zone ids"),
        ("http://[fe80::1%eth0]/", "zone ids"),
        ("http://[v1.x]/", "not a valid IPv6"),
        ("http://[::ffff:127.1]/", "not a valid IPv6"),
        ("http://[::ffff:0177.0.0.1]/", "not a valid IPv6"),
        ("http://%31%32%37.0.0.1/", "percent-encoded"),
        ("http://receiver%2eevil/", "percent-encoded"),
        ("http://exa mple.com/", "whitespace"),
        (" http://receiver/", "whitespace"),
        ("http://receiver/\n", "whitespace"),
        ("http://rec\teiver/", "whitespace"),
        ("http://rec\x00eiver/", "control"),
        ("http://rec\u200beiver/", "control"),  # zero-width space: UTS 46 would delete it
        ("http://receiver\u202e/", "control"),  # right-to-left override
        ("http://receiver\u3000/", "whitespace"),  # ideographic space
        ("http://evil.com\\@127.0.0.1/", "backslash"),
        ("http://receiver\\hook", "backslash"),
        ("http://a..b/", "not a valid host name"),
        ("http://./", "not a valid host name"),
        ("http://-receiver/", "not a valid host name"),
        ("http://rec!ver/", "not a valid host name"),
        ("http://rec*ver/", "not a valid host name"),
        ("http://" + "a" * 64 + ".com/", "not a valid host name"),
        ("http://xn--zz.com/", "invalid IDNA label"),
        ("http://ex_ämple.com/", "not a valid domain name"),
        ("http://" + "a." * 127 + "com/", "not a valid host name"),
        ("http://receiver/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_refused_urls(url: str, reason: str) -> None:
    assert reason in reason_for(url)


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0000.0000.0001", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("0.0", "0.0.0.0"),
        ("169.254.43518", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1"),  # full-width digits
        ("127。0。0。1", "127.0.0.1"),  # ideographic full stops
        ("10.1", "10.0.0.1"),  # allowed address, but still an unusual spelling
    ],
)
def test_unusual_ipv4_spellings_are_refused_naming_the_address(host: str, canonical: str) -> None:
    reason = reason_for(f"http://{host}:8080/hook")
    assert f"unusual spelling of the IPv4 address {canonical}" in reason


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "256.0.0.1", "1.2.3.256", "1.2.65536", "08.0.0.1", "1.2.3.09", "foo.123"]
)
def test_hosts_ending_in_a_number_must_be_ipv4(host: str) -> None:
    # WHATWG fails these; aiohttp would take digits-and-dots for an IP and skip the resolver.
    assert "looks like an IPv4 address" in reason_for(f"http://{host}/")


@pytest.mark.parametrize(
    "host",
    [
        "metadata",
        "METADATA.",
        "metadata.google.internal",
        "metadata.google.internal.",
        "Metadata.Google.Internal",
        "ⓜⓔⓣⓐⓓⓐⓣⓐ.google.internal",  # circled letters, mapped by UTS 46
        "computemetadata.metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "instance-data.eu-west-1.compute.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
        "metadata.packet.net",
        "rancher-metadata",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "kubernetes.default.svc.corp.example",
        # Finding 2: SRV-style names resolve to the API server too.
        "_https._tcp.kubernetes.default.svc.cluster.local",
        "_https._tcp.kubernetes.default",
        "_https._tcp.kubernetes",
        "_https._tcp.kubernetes.default.svc.cluster.local.",
        "_HTTPS._TCP.Kubernetes.Default.Svc",
        "_x._y._z.kubernetes.default.svc",
        "\uff4b\uff55\uff42\uff45\uff52\uff4e\uff45\uff54\uff45\uff53.default.svc",  # full-width
        "api.metadata.cloud.ibm.com",
    ],
)
def test_metadata_host_names_are_refused(host: str) -> None:
    assert "metadata or cluster control-plane" in reason_for(f"http://{host}/")


@pytest.mark.parametrize(
    "host",
    [
        "receiver.metadata",  # a service in a namespace called metadata
        "receiver.kubernetes",
        "kubernetes.monitoring",
        "metadata-api.ns.svc.cluster.local",
        "instance-data.ns.svc.cluster.local",
        "mymetadata.google.internal.example.com",
        "_https._tcp.receiver.ns.svc.cluster.local",
    ],
)
def test_near_misses_of_metadata_names_are_accepted(host: str) -> None:
    assert parse_callback_url(f"http://{host}/").host == host


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret-token@receiver/",
        "http://receiver/?token=s3cret-token\n",
        "http://receiver/?token=s3cret-token&x=" + "a" * 2048,
        "ftp://receiver/?token=s3cret-token",
        "http://receiver:/s3cret-token",
    ],
)
def test_reasons_never_echo_path_query_or_credentials(url: str) -> None:
    with pytest.raises(CallbackUrlRejected) as caught:
        parse_callback_url(url)
    assert "s3cret" not in caught.value.message
    assert "s3cret" not in str(caught.value)


def test_rejection_is_an_api_error_with_status_422() -> None:
    with pytest.raises(ApiError) as caught:
        parse_callback_url("ftp://receiver/")
    assert caught.value.status_code == 422
    assert (
        caught.value.message
        == "callback_url refused: scheme 'ftp' is not allowed; use http or https"
    )


# --- Address ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "'this network'"),
        ("0.1.2.3", "'this network'"),
        ("127.0.0.1", "loopback (127.0.0.0/8)"),
        ("127.255.255.254", "loopback"),
        ("169.254.169.254", "a cloud metadata service"),
        ("169.254.170.2", "ECS task credentials"),
        ("169.254.170.23", "EKS Pod Identity"),
        ("169.254.1.1", "link-local"),
        ("100.100.100.200", "Alibaba Cloud metadata"),
        ("168.63.129.16", "Azure platform endpoint"),
        ("192.0.0.192", "Oracle Cloud metadata"),
        ("192.0.0.8", "IETF protocol assignments"),
        ("192.0.2.1", "documentation (TEST-NET-1)"),
        ("198.51.100.7", "documentation (TEST-NET-2)"),
        ("203.0.113.9", "documentation (TEST-NET-3)"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("192.88.99.1", "6to4 relay anycast"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "limited broadcast"),
        ("::", "the unspecified address"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),  # even of an allowed address: write it as IPv4
        ("::ffff:169.254.169.254", "embeds 169.254.169.254 (IPv4-mapped)"),
        ("::ffff:0:7f00:1", "IPv4-translated"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("::8.8.8.8", "IPv4-compatible"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("ff05::1:3", "multicast"),
        ("100::1", "discard-only"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("2001:2::1", "benchmarking"),
        ("2001:10::1", "ORCHID"),
        ("2001:20::1", "ORCHIDv2"),
        ("fd00:ec2::254", "AWS instance service"),
        ("fd00:ec2::23", "AWS instance service"),
        ("fd20:ce::254", "GCP metadata"),
        ("fd00:42::42", "Scaleway metadata"),
        ("4000::1", "outside IPv6 global-unicast"),
        ("::2:0:0:1", "outside IPv6 global-unicast"),
        ("64:ff9b::7f00:1", "embeds 127.0.0.1 (NAT64)"),
        ("64:ff9b::a9fe:a9fe", "embeds 169.254.169.254 (NAT64)"),
        ("64:ff9b:1::7f00:1", "embeds 127.0.0.1 (local-use NAT64)"),
        ("64:ff9b:1:abcd::a9fe:a9fe", "embeds 169.254.169.254 (local-use NAT64)"),
        ("2002:7f00:1::1", "embeds 127.0.0.1 (6to4)"),
        ("2002:a9fe:a9fe::", "embeds 169.254.169.254 (6to4)"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "embeds 127.0.0.1 (Teredo client)"),
        ("2001:0:7f00:1::f7f7:f7f7", "embeds 127.0.0.1 (Teredo server)"),
        ("2600::5efe:7f00:1", "embeds 127.0.0.1 (ISATAP)"),
    ],
)
def test_denied_by_default(address: str, reason: str) -> None:
    refusal = DEFAULT.check_address(ip_address(address))
    assert refusal is not None
    assert reason in refusal
    assert str(ip_address(address)) in refusal


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.10",
        "100.64.0.1",  # CGNAT: pod and service ranges in some clusters
        "100.127.255.254",
        "8.8.8.8",
        "1.1.1.1",
        "169.255.0.1",
        "192.0.1.1",
        "fc00::1",
        "fd12:3456:789a::1",
        "fd00:ec3::254",
        "2606:4700:4700::1111",
        "64:ff9b::808:808",  # DNS64 answer for a public IPv4 receiver
        "64:ff9b::a00:1",
        "64:ff9b:1:abcd::808:808",
        "2002:808:808::1",
        "2001:0:808:808::f7f7:f7f7",  # Teredo: server and client public
    ],
)
def test_allowed_by_default(address: str) -> None:
    assert DEFAULT.check_address(ip_address(address)) is None


def test_allow_list_overrides_the_default_denials() -> None:
    assert ALLOW_LOOPBACK.check_address(IPv4Address("127.0.0.1")) is None
    assert ALLOW_LOOPBACK.check_address(IPv4Address("10.0.0.1")) == (
        "10.0.0.1 is not in the allowed networks"
    )
    assert ALLOW_LOOPBACK.check_address(IPv6Address("::1")) is not None
    assert ALLOW_LOOPBACK.check_address(IPv6Address("::ffff:127.0.0.1")) is not None


def test_metadata_endpoints_stay_denied_in_allow_list_mode() -> None:
    policy = NetworkPolicy.from_strings("169.254.0.0/16, 0.0.0.0/0, ::/0", "")
    assert policy.check_address(IPv4Address("169.254.1.1")) is None
    for address in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254", "64:ff9b::a9fe:a9fe"):
        refusal = policy.check_address(ip_address(address))
        assert refusal is not None
        assert "metadata" in refusal or "AWS" in refusal


# Finding 1: every major cloud's metadata and credential addresses, IPv4 and IPv6, with the
# cloud each belongs to; refused even when the operator allows everything.
METADATA_ADDRESSES = [
    ("169.254.169.254", "AWS, GCP, Azure, Oracle, Linode, DigitalOcean, Hetzner, OpenStack"),
    ("fd00:ec2::254", "AWS IMDS over IPv6"),
    ("169.254.170.2", "AWS ECS task credentials"),
    ("169.254.170.23", "AWS EKS Pod Identity"),
    ("fd00:ec2::23", "AWS EKS Pod Identity over IPv6"),
    ("fd20:ce::254", "GCP over IPv6"),
    ("168.63.129.16", "Azure WireServer"),
    ("192.0.0.192", "Oracle legacy"),
    ("fd00:c1::a9fe:a9fe", "Oracle over IPv6"),
    ("100.100.100.200", "Alibaba Cloud"),
    ("fd00:a9fe:a9fe::1", "Linode/Akamai over IPv6"),
    ("fe80::a9fe:a9fe", "OpenStack over IPv6"),
    ("169.254.42.42", "Scaleway"),
    ("fd00:42::42", "Scaleway over IPv6"),
    ("169.254.0.23", "Tencent Cloud"),
]


@pytest.mark.parametrize(("address", "cloud"), METADATA_ADDRESSES)
def test_every_clouds_metadata_address_is_always_refused(address: str, cloud: str) -> None:
    open_policy = NetworkPolicy.from_strings("0.0.0.0/0, ::/0", "")
    ip = ip_address(address)
    assert open_policy.check_address(ip) is not None, cloud
    assert DEFAULT.check_address(ip) is not None, cloud
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    assert refused(f"http://{literal}/latest/meta-data/", open_policy), cloud


def test_every_metadata_network_is_tested() -> None:
    tested = {ip_address(address) for address, _ in METADATA_ADDRESSES}
    for network, _ in METADATA_NETWORKS:
        assert any(ip in network for ip in tested), f"{network} has no test"


@pytest.mark.parametrize(
    ("ports", "port", "reason"),
    [
        (frozenset({80, 443}), 443, None),
        (frozenset({80, 443}), 10250, "not an allowed callback port"),
        (frozenset(), 10250, None),
        (frozenset({9100}), 9100, "the relay's own ports"),
    ],
)
def test_ports_are_part_of_the_policy(ports: frozenset[int], port: int, reason: str | None) -> None:
    policy = NetworkPolicy(allowed_ports=ports, denied_ports=frozenset({9100, 8000}))
    refusal = policy.check_port(port)
    assert refusal is None if reason is None else reason in (refusal or "")


def test_parse_ports() -> None:
    assert parse_ports("80, 443,8000-8002,") == {80, 443, 8000, 8001, 8002}
    for bad in ("0", "65536", "http", "90-80"):
        with pytest.raises(ValueError, match="port"):
            parse_ports(bad)


def test_denied_networks_always_win() -> None:
    policy = NetworkPolicy.from_strings("10.0.0.0/8", "10.1.0.0/16, 2001:db8:1::/48")
    assert policy.check_address(IPv4Address("10.2.0.1")) is None
    assert policy.check_address(IPv4Address("10.1.2.3")) == (
        "10.1.2.3 is in a denied network (10.1.0.0/16)"
    )
    default_plus = NetworkPolicy.from_strings("", "10.1.0.0/16")
    assert default_plus.check_address(IPv4Address("10.2.0.1")) is None
    assert default_plus.check_address(IPv4Address("10.1.0.1")) is not None
    # Embedded forms of a denied address are denied too, whatever the mode.
    assert default_plus.check_address(IPv6Address("64:ff9b::a01:1")) is not None
    assert default_plus.check_address(IPv6Address("::ffff:10.1.0.1")) is not None


def test_from_strings_accepts_spaces_empty_entries_and_bare_addresses() -> None:
    policy = NetworkPolicy.from_strings(" 10.0.0.0/8 ,, fd00::/8 ,", "192.168.1.1,")
    assert policy.allowed == (IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8"))
    assert policy.denied == (IPv4Network("192.168.1.1/32"),)
    assert NetworkPolicy.from_strings("", "") == NetworkPolicy()


@pytest.mark.parametrize(
    ("allowed", "denied", "message"),
    [
        ("10.0.0.1/8", "", "allowed networks: '10.0.0.1/8'"),
        ("10.0.0.0/8,banana", "", "allowed networks: 'banana'"),
        ("", "10.0.0.0/33", "denied networks: '10.0.0.0/33'"),
        ("", "fd00::/129", "denied networks: 'fd00::/129'"),
    ],
)
def test_from_strings_names_the_bad_cidr(allowed: str, denied: str, message: str) -> None:
    with pytest.raises(ValueError, match="CIDR network") as caught:
        NetworkPolicy.from_strings(allowed, denied)
    assert str(caught.value).startswith(message)


def test_parse_networks() -> None:
    assert parse_networks("") == ()
    assert parse_networks("127.0.0.0/8") == (IPv4Network("127.0.0.0/8"),)


# --- Properties ---------------------------------------------------------------------------


def addresses_in(networks: Sequence[IPNetwork]) -> st.SearchStrategy[IPAddress]:
    return st.sampled_from(networks).flatmap(
        lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(
            lambda value: IPv6Address(value) if net.version == 6 else IPv4Address(value)
        )
    )


DEFAULT_DENIED_V4 = [
    net for net, _ in DEFAULT_DENIED_NETWORKS + METADATA_NETWORKS if isinstance(net, IPv4Network)
]
DEFAULT_DENIED_V6 = [
    net for net, _ in DEFAULT_DENIED_NETWORKS + METADATA_NETWORKS if isinstance(net, IPv6Network)
]
RFC1918 = [ip_network(cidr) for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
ULA = [IPv6Network("fc00::/7")]


def is_default_denied_v4(ip: IPv4Address) -> bool:
    return any(ip in net for net in DEFAULT_DENIED_V4)


def spellings(ip: IPv4Address) -> list[str]:
    """Every way a client might be handed `ip`, dotted-decimal first."""
    a, b, c, d = ip.packed
    value = int(ip)
    dotted = str(ip)
    fullwidth = dotted.translate({ord(ch): ord(ch) + 0xFEE0 for ch in "0123456789"})
    return [
        dotted,
        str(value),
        hex(value),
        f"0X{value:X}",
        ".".join(f"0{part:o}" for part in (a, b, c, d)),
        ".".join(hex(part) for part in (a, b, c, d)),
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"0{a:o}.{b}.0x{c:x}.{d}",
        f"{dotted}.",
        fullwidth,
        dotted.replace(".", "。"),
        f"[::ffff:{dotted}]",
        f"[::ffff:{(a << 8) | b:x}:{(c << 8) | d:x}]",
        f"[::{dotted}]",
        f"[64:ff9b::{dotted}]",
        f"[2002:{(a << 8) | b:x}:{(c << 8) | d:x}::1]",
    ]


@given(addresses_in(DEFAULT_DENIED_V4), st.integers(1, 65535))
def test_default_denied_ipv4_is_refused_in_every_spelling(ip: IPv4Address, port: int) -> None:
    for spelling in spellings(ip):
        assert refused(f"http://{spelling}:{port}/hook"), spelling


@given(st.ip_addresses(v=4), st.lists(st.ip_addresses(v=4), min_size=1, max_size=3), st.data())
def test_operator_denied_ipv4_is_refused_in_every_spelling(
    ip: IPv4Address, others: list[IPv4Address], data: st.DataObject
) -> None:
    prefix = data.draw(st.integers(8, 32))
    denied = ip_network(f"{ip}/{prefix}", strict=False)
    policy = NetworkPolicy(
        allowed=(IPv4Network("0.0.0.0/0"), IPv6Network("::/0")),
        denied=(denied, *(IPv4Network(other) for other in others)),
    )
    for spelling in spellings(ip):
        assert refused(f"http://{spelling}/", policy), spelling


@given(st.ip_addresses(v=4))
def test_only_dotted_decimal_ipv4_is_accepted(ip: IPv4Address) -> None:
    dotted, *others = spellings(ip)
    assert parse_callback_url(f"http://{dotted}/").ip == ip
    for spelling in others:
        if spelling.startswith("["):
            continue  # IPv6 literals: a different address, judged by check_address
        reason = reason_for(f"http://{spelling}/")
        assert f"unusual spelling of the IPv4 address {ip}" in reason, spelling


@given(addresses_in(RFC1918))
def test_rfc1918_is_allowed_by_default(ip: IPAddress) -> None:
    parsed = parse_callback_url(f"http://{ip}:8080/hook")
    assert parsed.ip == ip
    assert DEFAULT.check_address(ip) is None


@given(addresses_in(ULA))
def test_unique_local_is_allowed_by_default_except_metadata(ip: IPAddress) -> None:
    assert isinstance(ip, IPv6Address)
    assume(not any(ip in net for net, _ in METADATA_NETWORKS))
    assume(ip.packed[8:12] not in (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe"))  # ISATAP
    assert DEFAULT.check_address(ip) is None
    assert parse_callback_url(f"http://[{ip}]/").ip == ip


@given(addresses_in(DEFAULT_DENIED_V6))
def test_default_denied_ipv6_is_refused(ip: IPAddress) -> None:
    assert refused(f"http://[{ip}]/")


@given(addresses_in(DEFAULT_DENIED_V4))
def test_transition_forms_of_denied_ipv4_are_refused(ip: IPv4Address) -> None:
    value = int(ip)
    forms = [
        IPv6Address(int(IPv6Address("64:ff9b::")) | value),  # NAT64
        IPv6Address((0x2002 << 112) | (value << 80) | 1),  # 6to4
        IPv6Address((0x20010000 << 96) | (0x08080808 << 64) | (value ^ 0xFFFFFFFF)),  # Teredo
    ]
    for form in forms:
        assert DEFAULT.check_address(form) is not None, form


@given(st.ip_addresses(v=4))
def test_nat64_of_an_allowed_ipv4_is_allowed(ip: IPv4Address) -> None:
    assume(DEFAULT.check_address(ip) is None)
    assert DEFAULT.check_address(IPv6Address(int(IPv6Address("64:ff9b::")) | int(ip))) is None


def networks() -> st.SearchStrategy[IPNetwork]:
    v4 = st.tuples(st.ip_addresses(v=4), st.integers(0, 32))
    v6 = st.tuples(st.ip_addresses(v=6), st.integers(0, 128))
    return st.one_of(v4, v6).map(lambda pair: ip_network(f"{pair[0]}/{pair[1]}", strict=False))


@given(
    st.lists(networks(), min_size=1, max_size=4),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
)
def test_allow_list_mode_allows_exactly_the_list(
    allowed: list[IPNetwork], ip: IPv4Address | IPv6Address
) -> None:
    policy = NetworkPolicy(allowed=tuple(allowed))
    assume(
        NetworkPolicy(allowed=(ip_network("0.0.0.0/0"), ip_network("::/0"))).check_address(ip)
        is None
    )
    assert (policy.check_address(ip) is None) == any(ip in net for net in allowed)


@given(st.lists(networks(), min_size=1, max_size=4), st.data())
def test_allow_list_mode_allows_addresses_drawn_from_the_list(
    allowed: list[IPNetwork], data: st.DataObject
) -> None:
    ip = data.draw(addresses_in(allowed))
    policy = NetworkPolicy(allowed=tuple(allowed))
    if NetworkPolicy(allowed=(ip_network("0.0.0.0/0"), ip_network("::/0"))).check_address(ip):
        assert policy.check_address(ip) is not None  # metadata: denied whatever the list says
    else:
        assert policy.check_address(ip) is None


@given(st.lists(networks(), max_size=3), networks(), st.data())
def test_denied_wins_over_allowed(
    allowed: list[IPNetwork], denied: IPNetwork, data: st.DataObject
) -> None:
    ip = data.draw(addresses_in([denied]))
    policy = NetworkPolicy(allowed=(*allowed, denied), denied=(denied,))
    assert policy.check_address(ip) is not None


# Starting with r keeps the metadata names (metadata, kubernetes, instance-data) out.
LABEL = st.from_regex(r"r[a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@given(st.lists(LABEL, min_size=1, max_size=4), st.sampled_from(["http", "https"]))
def test_host_names_round_trip_and_clients_agree(labels: list[str], scheme: str) -> None:
    url = f"{scheme}://{'.'.join(labels)}/hook"
    parsed = parse_callback_url(url)
    assert parse_callback_url(parsed.url) == parsed
    assert yarl.URL(parsed.url).raw_host == parsed.host
    assert httpx.URL(parsed.url).raw_host.decode() == parsed.host
    assert not is_ip_address(parsed.host)  # so aiohttp will ask the policy's resolver


@given(st.text(max_size=60))
def test_arbitrary_text_is_parsed_or_refused_and_clients_agree_on_the_host(text: str) -> None:
    for url in (text, f"http://{text}", f"http://{text}/"):
        try:
            parsed = parse_callback_url(url)
        except CallbackUrlRejected:
            continue
        assert parse_callback_url(parsed.url) == parsed
        assert yarl.URL(parsed.url).raw_host == parsed.host
        assert httpx.URL(parsed.url).raw_host.decode() == parsed.host
        # aiohttp skips the resolver exactly for the literals that check_address judges.
        assert is_ip_address(parsed.host) == (parsed.ip is not None)


# --- Resolution ---------------------------------------------------------------------------


async def test_localhost_is_refused_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery.netpolicy")
    with pytest.raises(CallbackUrlRejected) as caught:
        await resolve_and_check(parse_callback_url("http://localhost:8080/"), DEFAULT)
    # The caller is not told where the name points (issue #24, finding 2); the log is.
    assert caught.value.reason == "host 'localhost' is unknown or in a refused network"
    assert "loopback" in caplog.text


async def test_localhost_is_allowed_when_loopback_is_allowed() -> None:
    # ::1 as well: every address must pass, and localhost may resolve to both.
    policy = NetworkPolicy.from_strings("127.0.0.0/8, ::1/128", "")
    addresses = await resolve_and_check(parse_callback_url("http://localhost:8080/"), policy)
    assert IPv4Address("127.0.0.1") in addresses
    assert all(address.is_loopback for address in addresses)


async def test_literal_addresses_are_checked_not_resolved() -> None:
    url = parse_callback_url("http://10.1.2.3:9000/")
    assert await resolve_and_check(url, DEFAULT) == [IPv4Address("10.1.2.3")]
    with pytest.raises(CallbackUrlRejected, match=r"169\.254\.169\.254 is a cloud metadata"):
        await resolve_and_check(parse_callback_url("http://169.254.169.254/"), DEFAULT)


async def test_unresolvable_names_are_refused() -> None:
    with pytest.raises(CallbackUrlRejected) as caught:
        await resolve_and_check(parse_callback_url("http://receiver.invalid/"), DEFAULT)
    # In the same words as a name resolving into a refused network.
    assert caught.value.reason == "host 'receiver.invalid' is unknown or in a refused network"
