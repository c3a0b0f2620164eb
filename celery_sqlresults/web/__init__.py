"""A small read-only monitoring view and JSON API over the stored results.

``celery -A proj results serve`` runs it with uvicorn; from Python,
:func:`create_app` returns the Starlette (ASGI) application for any ASGI
server. Needs the ``web`` extra: ``pip install "celery-sqlresults[web]"``.
"""

from __future__ import annotations

from .app import LOOPBACK_HOSTS, create_app, mask_token, serve_hosts

__all__ = ["LOOPBACK_HOSTS", "create_app", "mask_token", "serve_hosts"]
