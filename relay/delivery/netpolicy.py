"""Where the relay may send callbacks: the guard against server-side request forgery.

Internal callers hand the relay a `callback_url` and the relay later POSTs to it from inside
the cluster, so a URL must never reach the node, the cloud's metadata service or anything else
that trusts the pod's network position. The checks, in the order a URL meets them:

1. `parse_callback_url`, syntax only: http or https, a host, no credentials, at most 2,048
   characters, and a host that every client reads the same way. IPv4 literals must be
   dotted-decimal: legacy spellings (`127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`,
   `127.0.0.1.`, full-width digits) are refused, not normalised, because clients disagree on
   them (WHATWG normalises, Python's `ipaddress` and httpx refuse, aiohttp >= 3.14 refuses).
   Percent-encoded hosts, IPv6 zone ids, whitespace and control characters are refused too,
   and so are the host names of metadata services.
2. `NetworkPolicy.check_address`, one IP address against the ranges, first match wins:
   - always denied: the cloud metadata and credential endpoints in `METADATA_NETWORKS` and the
     operator's `denied` networks, whether they are the address itself or an IPv4 address
     embedded in it (IPv4-mapped, NAT64, 6to4, Teredo, ISATAP);
   - allow-list mode (`allowed` non-empty): allowed exactly when inside `allowed`;
   - default mode: the special-purpose ranges in `DEFAULT_DENIED_NETWORKS`, IPv6 outside
     global-unicast/unique-local space, and transition forms embedding a denied IPv4 address
     are denied; everything else is allowed, private ranges included, because the receivers
     are internal services.
3. `resolve_and_check`: every address the host resolves to must pass; one denied address
   refuses the URL, because a name that mixes good and bad answers is how rebinding starts.
   A refused name is refused in the same words whether it does not resolve or resolves into a
   refused network, and its addresses are never named (`refused_name`): the caller would
   otherwise learn which names exist inside the cluster and where they point. The log has it.

The delivery side repeats these checks at connect time and connects only to the addresses it
checked (`relay.delivery.transport`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import TypeAlias

import idna

from relay.errors import CallbackUrlRejected
from relay.settings import Settings, parse_networks, parse_ports

log = logging.getLogger(__name__)

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network

MAX_URL_LENGTH = 2048
DEFAULT_RESOLVE_TIMEOUT = 5.0


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ip_network(cidr), description) for cidr, description in rows)


# Denied even in allow-list mode: no receiver lives here, and one request can leak the node's
# cloud credentials. Most sit in link-local space (refused by default anyway), but Azure's
# platform endpoint is a public address, Alibaba's is in 100.64/10 and the IPv6 ones are in
# fc00::/7, all otherwise allowed; and allow-list mode must not open any of them. Each entry
# names its source.
METADATA_NETWORKS = _table(
    # AWS https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html
    # GCP https://cloud.google.com/compute/docs/metadata/querying-metadata
    # Azure https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service
    # Oracle https://docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm
    # Linode/Akamai https://techdocs.akamai.com/cloud-computing/docs/metadata-service-api
    # DigitalOcean https://docs.digitalocean.com/reference/api/metadata/
    # Hetzner https://docs.hetzner.cloud/#server-metadata
    # OpenStack https://docs.openstack.org/nova/latest/user/metadata.html
    ("169.254.169.254/32", "a cloud metadata service"),
    # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-iam-roles.html
    ("169.254.170.2/32", "the AWS ECS task credentials endpoint"),
    # https://docs.aws.amazon.com/eks/latest/userguide/pod-id-how-it-works.html
    ("169.254.170.23/32", "the EKS Pod Identity agent"),
    # https://www.scaleway.com/en/docs/instances/reference-content/instances-metadata/
    ("169.254.42.42/32", "the Scaleway metadata service"),
    # https://www.tencentcloud.com/document/product/213/4934 (metadata.tencentyun.com)
    ("169.254.0.23/32", "the Tencent Cloud metadata service"),
    # https://www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata
    ("100.100.100.200/32", "the Alibaba Cloud metadata service"),
    # https://learn.microsoft.com/azure/virtual-network/what-is-ip-address-168-63-129-16
    ("168.63.129.16/32", "the Azure platform endpoint (WireServer)"),
    # Oracle's legacy v1 address, same page as above.
    ("192.0.0.192/32", "the Oracle Cloud metadata service"),
    # IMDS at ::254 and EKS Pod Identity at ::23, plus AWS DNS and NTP (same AWS pages as
    # above); a random ULA prefix colliding with this /64 is not a practical worry.
    ("fd00:ec2::/64", "an AWS instance service (IMDS, EKS Pod Identity)"),
    # GCP, same page as above.
    ("fd20:ce::254/128", "the GCP metadata service"),
    # Oracle, same page as above (IPv6-enabled VCNs).
    ("fd00:c1::a9fe:a9fe/128", "the Oracle Cloud metadata service"),
    # Linode/Akamai, same page as above.
    ("fd00:a9fe:a9fe::1/128", "the Linode (Akamai) metadata service"),
    # Scaleway, same page as above.
    ("fd00:42::42/128", "the Scaleway metadata service"),
    # OpenStack, same page as above: the IPv6 metadata address, link-local with a zone.
    ("fe80::a9fe:a9fe/128", "the OpenStack metadata service"),
)

# Default mode only. 10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT, used for pod and service
# ranges by several CNIs and by Tailscale) and fc00::/7 are deliberately absent: receivers
# are internal services. An operator who wants any of them closed lists it in the denied
# networks.
DEFAULT_DENIED_NETWORKS = _table(
    ("0.0.0.0/8", "'this network' (0.0.0.0 reaches the local host)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata and node agents)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "the deprecated 6to4 relay anycast"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "limited broadcast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    # Transition forms a dual-stack socket or the kernel may deliver to IPv4: no receiver
    # needs them, so they are refused whatever they embed (write the IPv4 address instead).
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("100::/64", "discard-only"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "ORCHID (deprecated)"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)

# In default mode IPv6 must be global unicast or unique-local; NAT64 prefixes are allowed
# because IPv6-only clusters reach IPv4 receivers through DNS64 (their embedded IPv4 address
# is checked instead).
_IPV6_UNICAST = tuple(
    ip_network(cidr) for cidr in ("2000::/3", "fc00::/7", "64:ff9b::/96", "64:ff9b:1::/48")
)

_NAT64 = ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ip_network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ip_network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ip_network("::/96")
_ISATAP_IDS = (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")

# Compared without a trailing dot and without leading `_service._proto` labels (DNS-SD and
# Kubernetes' SRV names resolve to the same addresses). The address checks catch most of these
# already; names are refused as well because some resolve to public addresses (Equinix Metal)
# and because the allow-list mode must not let them through. Subdomains of the dotted names
# are refused too, but a single label is matched exactly: `receiver.metadata` is a service in
# a namespace. Azure, Oracle, Alibaba, Linode, DigitalOcean, Hetzner and OpenStack document
# their metadata services by address only.
METADATA_HOST_NAMES = frozenset(
    {
        # GCP (page above): the short name works through the resolver's search path.
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        # AWS (page above).
        "instance-data",
        "instance-data.ec2.internal",
        # Tencent (page above).
        "metadata.tencentyun.com",
        # https://cloud.ibm.com/docs/vpc?topic=vpc-imd-about
        "api.metadata.cloud.ibm.com",
        # https://deploy.equinix.com/developers/docs/metal/server-metadata/metadata/
        "metadata.platformequinix.com",  # public addresses, per-instance answers
        "metadata.packet.net",
        # https://rancher.com/docs/rancher/v1.6/en/rancher-services/metadata-service/
        "rancher-metadata",
        # The cluster's API server: never a webhook receiver. Through the search path each of
        # these resolves from a pod; the full names are matched by the pattern below.
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    }
)
_METADATA_HOST_PATTERN = re.compile(
    r"kubernetes\.default\.svc\.[a-z0-9_.-]+"  # any cluster domain
    r"|instance-data\.[a-z0-9_.-]+\.internal"  # AWS, through the VPC's DNS suffixes
)
# DNS-SD / SRV-style leading labels: `_https._tcp.kubernetes.default.svc.cluster.local` is
# answered with the API server's address by CoreDNS, like the plain name.
_SERVICE_LABELS = re.compile(r"(?:_[a-z0-9-]*\.)+")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Addresses whose verdict a policy remembers at most (then it starts again).
MAX_REMEMBERED = 4096


@dataclass(frozen=True)
class ParsedCallbackUrl:
    """A callback URL that passed `parse_callback_url`; store `url`, not the original."""

    url: str  # normalised: lower-case scheme and host, IDNA A-labels, compressed IPv6
    scheme: str
    host: str  # ASCII; IPv6 without brackets; a trailing dot is kept (it changes resolution)
    port: int  # explicit or the scheme's default
    ip: IPAddress | None  # set when the host is an IP literal, which is never resolved


@dataclass(frozen=True)
class NetworkPolicy:
    """Which addresses and ports callbacks may reach.

    The default instance applies the address defaults and admits any port; the production
    default (`callback_policy`) also limits ports to RELAY_CALLBACK_ALLOWED_PORTS and
    refuses the relay's own ports.
    """

    allowed: tuple[IPNetwork, ...] = ()
    denied: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] = frozenset()  # empty: any port
    denied_ports: frozenset[int] = frozenset()  # always wins
    # Verdicts by address, remembered: a check walks every network in Python (~10 µs), and
    # submissions and deliveries meet the same few addresses again and again.
    _verdicts: dict[IPAddress, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def check_port(self, port: int) -> str | None:
        """Return None when callbacks may go to `port`, else why not."""
        if port in self.denied_ports:
            return f"port {port} is one of the relay's own ports"
        if self.allowed_ports and port not in self.allowed_ports:
            return f"port {port} is not an allowed callback port (RELAY_CALLBACK_ALLOWED_PORTS)"
        return None

    @classmethod
    def from_strings(cls, allowed: str, denied: str) -> NetworkPolicy:
        """Build from the two environment values; raise ValueError naming the bad CIDR."""
        try:
            allowed_networks = parse_networks(allowed)
        except ValueError as exc:
            raise ValueError(f"allowed networks: {exc}") from exc
        try:
            denied_networks = parse_networks(denied)
        except ValueError as exc:
            raise ValueError(f"denied networks: {exc}") from exc
        return cls(allowed=allowed_networks, denied=denied_networks)

    def check_address(self, ip: IPAddress) -> str | None:
        """Return None when callbacks may reach `ip`, else why not, naming the address."""
        try:
            return self._verdicts[ip]
        except KeyError:
            pass
        if len(self._verdicts) >= MAX_REMEMBERED:
            self._verdicts.clear()
        verdict = self._verdicts[ip] = self._check_address(ip)
        return verdict

    def _check_address(self, ip: IPAddress) -> str | None:
        reason = self._always_denied(ip)
        if reason is not None:
            return reason
        if self.allowed:
            if any(ip in network for network in self.allowed):
                return None
            return f"{ip} is not in the allowed networks"
        return _default_denied(ip)

    def check_addresses(self, addresses: Iterable[IPAddress]) -> str | None:
        """The first refusal among `addresses`, or None when every one may be reached."""
        for ip in addresses:
            reason = self.check_address(ip)
            if reason is not None:
                return reason
        return None

    def _always_denied(self, ip: IPAddress) -> str | None:
        table = METADATA_NETWORKS + tuple((net, "in a denied network") for net in self.denied)
        reason = _match(ip, table)
        if reason is None and isinstance(ip, IPv6Address):
            for mechanism, embedded in _embedded_ipv4(ip):
                inner = _match(embedded, table)
                if inner is not None:
                    return f"{ip} embeds {embedded} ({mechanism}): {inner}"
        return reason


def callback_policy(settings: Settings) -> NetworkPolicy:
    """The policy the relay runs with, from RELAY_CALLBACK_* (checked when settings load)."""
    policy = NetworkPolicy.from_strings(
        settings.callback_allowed_networks, settings.callback_denied_networks
    )
    return replace(
        policy,
        allowed_ports=parse_ports(settings.callback_allowed_ports),
        # The relay's own ports: a callback must not reach its API or a worker's metrics.
        denied_ports=frozenset(
            port for port in (settings.api_port, settings.worker_http_port) if port
        ),
    )


def _match(ip: IPAddress, table: Iterable[tuple[IPNetwork, str]]) -> str | None:
    for network, description in table:
        if ip in network:
            return f"{ip} is {description} ({network})"
    return None


def _default_denied(ip: IPAddress) -> str | None:
    reason = _match(ip, DEFAULT_DENIED_NETWORKS)
    if reason is not None or isinstance(ip, IPv4Address):
        return reason
    if not any(ip in network for network in _IPV6_UNICAST):
        return f"{ip} is outside IPv6 global-unicast and unique-local space (reserved)"
    for mechanism, embedded in _embedded_ipv4(ip):
        inner = _match(embedded, DEFAULT_DENIED_NETWORKS)
        if inner is not None:
            return f"{ip} embeds {embedded} ({mechanism}): {inner}"
    return None


def _embedded_ipv4(ip: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses a packet to `ip` may end up at, by transition mechanism."""
    packed = ip.packed
    low32 = IPv4Address(packed[12:])
    found: list[tuple[str, IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _IPV4_TRANSLATED:
        found.append(("IPv4-translated", low32))
    elif ip in _IPV4_COMPATIBLE:
        # :: and ::1 too: they reach the local host just as 0.0.0.0 and 0.0.0.1 would.
        found.append(("IPv4-compatible", low32))
    if ip in _NAT64:
        found.append(("NAT64", low32))
    if ip in _LOCAL_NAT64:
        # Only the /96 layout, the usual one. RFC 6052 also allows /48../64 prefixes inside
        # 64:ff9b:1::/48, but the layouts overlap: decoding them all reads most addresses as
        # some 0.x.x.x and refuses them for nothing.
        found.append(("local-use NAT64", low32))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found.extend((("Teredo client", client), ("Teredo server", server)))
    if packed[8:12] in _ISATAP_IDS:
        found.append(("ISATAP", low32))
    return found


@functools.lru_cache(maxsize=1024)
def parse_callback_url(url: str) -> ParsedCallbackUrl:
    """Check a callback URL's syntax and normalise it; raise CallbackUrlRejected.

    Network policy is not applied here, except that metadata host names are refused.
    Remembered (a rejection is not): callers submit, and deliveries go to, the same few URLs
    again and again, and the API and every delivery attempt parse them.
    """
    if len(url) > MAX_URL_LENGTH:
        raise CallbackUrlRejected(f"longer than {MAX_URL_LENGTH} characters")
    # Clients disagree on stripping or keeping these (WHATWG drops tabs and newlines inside
    # the URL, urllib keeps them), and a backslash is a slash to WHATWG but not to urllib.
    if any(_is_invisible(char) for char in url):
        raise CallbackUrlRejected("contains whitespace or control characters")
    if "\\" in url:
        raise CallbackUrlRejected("contains a backslash")
    match = _SCHEME.fullmatch(url)
    if match is None:
        raise CallbackUrlRejected("is not an absolute http or https URL")
    scheme = match[1].lower()
    if scheme not in _DEFAULT_PORTS:
        raise CallbackUrlRejected(f"scheme {scheme!r} is not allowed; use http or https")
    if not match[2].startswith("//"):
        raise CallbackUrlRejected("is not an absolute http or https URL")
    after_slashes = match[2][2:]
    end = len(after_slashes)
    for delimiter in "/?#":
        position = after_slashes.find(delimiter)
        if position != -1:
            end = min(end, position)
    authority, rest = after_slashes[:end], after_slashes[end:]
    if "@" in authority:
        # Not echoed: the part before the @ is usually a password.
        raise CallbackUrlRejected("must not contain credentials (user:password@)")

    host_text, port_text = _split_authority(authority)
    port = _DEFAULT_PORTS[scheme]
    if port_text == "":
        raise CallbackUrlRejected("has an empty port after ':'")
    if port_text is not None:
        if _PORT.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
            raise CallbackUrlRejected(f"port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)

    host, ip = _parse_host(host_text)
    host_in_url = f"[{host}]" if isinstance(ip, IPv6Address) else host
    port_in_url = f":{port}" if port_text is not None else ""
    normalised = f"{scheme}://{host_in_url}{port_in_url}{rest or '/'}"
    if len(normalised) > MAX_URL_LENGTH:
        raise CallbackUrlRejected(
            f"longer than {MAX_URL_LENGTH} characters once its host is encoded"
        )
    return ParsedCallbackUrl(url=normalised, scheme=scheme, host=host, port=port, ip=ip)


def _is_invisible(char: str) -> bool:
    # Controls, format characters (zero-width, bidi), separators, surrogates, unassigned.
    return char.isspace() or unicodedata.category(char)[0] in "CZ"


def _split_authority(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise CallbackUrlRejected("has an unterminated IPv6 literal")
        host_text, after = authority[: close + 1], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise CallbackUrlRejected("has characters after its IPv6 literal")
        return host_text, after[1:] if after else None
    host_text, colon, port_text = authority.partition(":")
    if ":" in port_text:
        raise CallbackUrlRejected("has an IPv6 address outside brackets or more than one port")
    return host_text, port_text if colon else None


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Return the normalised host and, for literals, its address."""
    if not text:
        raise CallbackUrlRejected("has no host")
    if text.startswith("["):
        return _parse_ipv6_literal(text[1:-1])
    if "%" in text:
        raise CallbackUrlRejected(f"host {text!r} is percent-encoded")
    if text.isascii():
        host = text.lower()
    else:
        try:
            # UTS 46 maps what browsers map: full-width digits and dots, circled letters...
            host = idna.encode(text, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as exc:
            raise CallbackUrlRejected(f"host {text!r} is not a valid domain name ({exc})") from exc

    name = host.removesuffix(".")
    labels = name.split(".")
    if _ends_in_number(labels[-1]):
        # WHATWG reads any host ending in a numeric label as IPv4; so does aiohttp's
        # is-it-an-IP heuristic (digits and dots), which would then skip the resolver.
        ipv4 = _parse_whatwg_ipv4(labels)
        if ipv4 is None:
            raise CallbackUrlRejected(f"host {text!r} looks like an IPv4 address but is not one")
        if text != str(ipv4):
            raise CallbackUrlRejected(
                f"host {text!r} is an unusual spelling of the IPv4 address {ipv4}; "
                "write IPv4 addresses in dotted-decimal form"
            )
        return host, ipv4
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CallbackUrlRejected(f"host {text!r} is not a valid host name")
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise CallbackUrlRejected(
                    f"host {text!r} has an invalid IDNA label ({exc})"
                ) from exc
    if _is_metadata_name(name):
        raise CallbackUrlRejected(
            f"host {text!r} names a cloud metadata or cluster control-plane service"
        )
    return host, None


def _parse_ipv6_literal(inner: str) -> tuple[str, IPAddress]:
    if "%" in inner:
        # Zone ids only make sense for link-local addresses, which are refused anyway, and
        # clients disagree on whether the % must be percent-encoded.
        raise CallbackUrlRejected("IPv6 zone ids are not allowed")
    try:
        ipv6 = IPv6Address(inner)
    except ValueError as exc:
        raise CallbackUrlRejected(f"host [{inner}] is not a valid IPv6 address") from exc
    return ipv6.compressed, ipv6


def _is_metadata_name(name: str) -> bool:
    service = _SERVICE_LABELS.match(name)
    if service is not None and _is_metadata_name(name[service.end() :]):
        return True
    if name in METADATA_HOST_NAMES or _METADATA_HOST_PATTERN.fullmatch(name):
        return True
    return any(name.endswith(f".{known}") for known in METADATA_HOST_NAMES if "." in known)


def _ends_in_number(label: str) -> bool:
    return re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]*", label) is not None


def _parse_whatwg_ipv4(labels: list[str]) -> IPv4Address | None:
    """The WHATWG URL standard's IPv4 parser (glibc's inet_aton agrees on valid input)."""
    if len(labels) > 4:
        return None
    numbers: list[int] = []
    for label in labels:
        if re.fullmatch(r"0[xX][0-9a-fA-F]*", label):
            numbers.append(int(label[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+", label):
            numbers.append(int(label[1:], 8))
        elif re.fullmatch(r"0|[1-9][0-9]*", label):
            numbers.append(int(label))
        else:
            return None
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return IPv4Address(value)


def refused_name(host: str, why: str) -> str:
    """Why the host name `host` is refused, as callers are told: the same words whatever `why`
    (it did not resolve, or resolved into a refused network), which only the log gets."""
    log.info("callback host %r refused: %s", host, why)
    return f"host {host!r} is unknown or in a refused network"


async def resolve_and_check(
    url: ParsedCallbackUrl, policy: NetworkPolicy, *, timeout: float = DEFAULT_RESOLVE_TIMEOUT
) -> list[IPAddress]:
    """Resolve the host (literals are not resolved) and return its addresses if all may be
    reached; raise CallbackUrlRejected (for a name, in `refused_name`'s words)."""
    port_reason = policy.check_port(url.port)
    if port_reason is not None:
        raise CallbackUrlRejected(port_reason)
    if url.ip is not None:
        reason = policy.check_address(url.ip)
        if reason is not None:
            raise CallbackUrlRejected(reason)
        return [url.ip]
    addresses = await _resolve(url.host, url.port, timeout)
    reason = policy.check_addresses(addresses)
    if reason is not None:
        raise CallbackUrlRejected(refused_name(url.host, reason))
    return addresses


async def _resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            # The same call and flags aiohttp's ThreadedResolver makes at delivery time, so
            # the check sees the answers the connection will.
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
            )
    except socket.gaierror as exc:
        raise CallbackUrlRejected(refused_name(host, f"did not resolve ({exc.strerror})")) from exc
    except TimeoutError as exc:
        raise CallbackUrlRejected(
            refused_name(host, f"did not resolve within {timeout:g} s")
        ) from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        # Scope ids (fe80::1%eth0) carry no policy meaning; the address decides.
        ip = ip_address(str(sockaddr[0]).partition("%")[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise CallbackUrlRejected(refused_name(host, "has no addresses"))
    return addresses
