"""The review page: where people review what runs wait for, signed in, in a browser.

``create_app(steward, auth=TokenAuth())`` is an ASGI application (Starlette) that a
user serves with uvicorn (``agentflow serve MODULE``) or mounts in their own app;
``TokenAuth`` and ``HeaderAuth`` say who the reviewer is. See :mod:`agentflow.review.app`.
"""

from ..types import Webhook
from .app import create_app
from .auth import HeaderAuth, TokenAuth

__all__ = ["HeaderAuth", "TokenAuth", "Webhook", "create_app"]
