"""Callers: the services that use the relay, each with its own keys, role and limits.

`model` holds what one caller is and reads a callers file's contents into a `CallerBook`;
`source` gives every process the book in force (RELAY_CALLERS_FILE, re-read when it changes,
or RELAY_API_KEYS as one caller).
"""
