"""``agentflow serve MODULE``: the review page of a module's workflows."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import AgentflowError
from ..steward import Steward


async def _serve(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """Serve the review page of the module's workflows until SIGTERM / SIGINT."""
    import uvicorn

    from ..review import HeaderAuth, TokenAuth, create_app

    auth: HeaderAuth | TokenAuth = TokenAuth()
    if args.auth == "header":
        secret = os.environ.get(args.header_secret_env or "", "")
        if not args.header or not secret:
            raise AgentflowError(
                "--auth header needs --header (the header the proxy names the user in) and "
                "--header-secret-env (an environment variable holding the secret the proxy sends "
                "in X-Agentflow-Secret), and that variable set"
            )
        auth = HeaderAuth(args.header, secret)
    app = create_app(steward, auth=auth, execute=not args.workers)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, proxy_headers=True, timeout_graceful_shutdown=3, log_level="info"
    )
    names = ", ".join(w.name for w in steward.workflows())
    runs = "agentflow worker processes go on with decided runs" if args.workers else "decided runs go on here"
    print(f"review page of {names} on http://{args.host}:{args.port} ({runs})", file=out, flush=True)
    await uvicorn.Server(config).serve()
    return 0
