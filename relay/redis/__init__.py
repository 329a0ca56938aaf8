"""The Redis plumbing every stage stands on: the key scheme, scripts, coalesced round trips, the
connection, Redis's clock, the data-loss watch, leases, and the relay-wide figures."""
