"""``python -m agentflow``: the ``agentflow`` command."""

from .cli import main

raise SystemExit(main())
