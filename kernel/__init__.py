"""The kernel: what every layer may use and which uses nothing of the project's.

Errors and their codes, scopes and the caller, token verification, settings, the cache and pub/sub clients,
per-caller limits. Nothing here imports ``db``, a domain, the GraphQL surface or the app.
"""
