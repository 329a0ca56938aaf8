"""Callback URLs as hostile callers write them: one generator for the submit check and delivery."""

from __future__ import annotations

from hypothesis import strategies as st

# Letters clients map or encode differently: full-width, circled, sharp s, accents, Greek,
# Cyrillic, dotless i, upper case, plus the characters a host name may hold.
_HOST_CHARS = "abcXYZ019-_\uff45\uff58\uff21\uff11\u24dc\u00df\u00e9\u03a3\u03c3\u0436\u0131\u0130"
_PATH_CHARS = "abcXYZ019-._~!$&'()*+,;=:@/?#[]%\u00e9\u0436 \uff45\"<>^`{|}"

labels = st.text(_HOST_CHARS, min_size=1, max_size=12)
hosts = st.builds(
    lambda parts, dot: ".".join(parts) + dot,
    st.lists(labels, min_size=1, max_size=3),
    st.sampled_from(["", "."]),
)
paths = st.text(_PATH_CHARS, max_size=30).map(lambda text: "/" + text)


def callback_urls(port: int) -> st.SearchStrategy[str]:
    """http URLs to any host on `port` (tests resolve every name to the server under test)."""
    schemes = st.sampled_from(["http", "HTTP", "hTtP"])
    return st.builds(
        lambda scheme, host, path: f"{scheme}://{host}:{port}{path}", schemes, hosts, paths
    )
