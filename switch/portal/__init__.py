"""The merchant back office portal (issue 8): a Starlette app where a merchant logs in with its MID
and a password and sees only its own transactions, settlement, terminals and notifications.

Modules: ``accounts`` (password hashes, lockout, the portal tables), ``auth`` (server-side sessions
and CSRF), ``data`` (the merchant-scoped reads behind each page), ``texts`` (zh-CN wording),
``app`` (routes and ``serve_portal``), ``password_cli`` (``switch merchant set-password``) and
``demo`` (the demo fixture's passwords).

This package must not encode or decode wire messages, write journal rows, or show a clear PAN,
ID card, settlement account or password; importing it must not import Starlette (the CLI and the
demo use ``accounts`` alone).
"""
