"""``python -m agentflow.cli``: the ``agentflow`` command."""

from . import main

raise SystemExit(main())
