"""The three distributions as a new user gets them: wheels, a wheelhouse, a clean venv.

``python -m build`` makes the wheels of agentflow-core, agentflow-openai and
agentflow-anthropic (from a copy of their sources, so no stale ``build/`` folder of the
checkout leaks into them); ``pip install --find-links`` installs the core with both
provider extras into a fresh venv, taking the project's own distributions from the
wheelhouse and only their dependencies from the index; then an example runs from that
venv. The name ``agentflow`` on PyPI belongs to an unrelated project, which must not
come in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
#: Distribution name -> (project folder, import package).
PROJECTS = {
    "agentflow-core": (ROOT, "agentflow"),
    "agentflow-openai": (ROOT / "providers" / "openai", "agentflow_openai"),
    "agentflow-anthropic": (ROOT / "providers" / "anthropic", "agentflow_anthropic"),
}


def _run(args: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    # Nothing of this process's environment may point the child at the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} failed:\n{output}"
    return output


def _source_copy(project: Path, package: str, into: Path) -> Path:
    """The files a wheel is built from: pyproject.toml, the README and the import package."""
    into.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(project / name, into / name)
    shutil.copytree(project / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def test_wheels_install_from_a_wheelhouse_into_a_clean_venv_and_run_an_example(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "dist"
    for name, (project, package) in PROJECTS.items():
        source = _source_copy(project, package, tmp_path / "src" / name)
        log = _run([sys.executable, "-m", "build", "--wheel", "--outdir", wheelhouse, source], tmp_path)
        assert not re.search(r"deprecat", log, re.I), f"{name}: the build warns:\n{log}"
    assert sorted(p.name for p in wheelhouse.iterdir()) == [
        "agentflow_anthropic-0.1.0-py3-none-any.whl",
        "agentflow_core-0.1.0-py3-none-any.whl",
        "agentflow_openai-0.1.0-py3-none-any.whl",
    ]

    venv.create(tmp_path / "venv", with_pip=True)  # no system site-packages, nothing of the checkout
    python = tmp_path / "venv" / "bin" / "python"
    report = tmp_path / "report.json"
    _run(
        [
            python, "-m", "pip", "install", "--quiet", "--find-links", wheelhouse, "--report", report,
            "agentflow-core[openai,anthropic]",
        ],
        tmp_path,
    )  # fmt: skip
    installed = {
        item["metadata"]["name"]: item["download_info"]["url"]
        for item in json.loads(report.read_text())["install"]
    }
    for name in PROJECTS:
        assert installed[name].startswith(wheelhouse.as_uri()), f"{name} came from {installed[name]}"
    assert "agentflow" not in installed  # the unrelated project of that name
    assert {"openai", "anthropic", "pydantic", "tenacity"} <= set(installed)  # from the index

    where = _run(
        [
            python, "-c",
            "import agentflow, agentflow_openai, agentflow_anthropic\n"
            "from agentflow.agents import load_provider\n"
            "print(agentflow.__file__)\n"
            "print(type(load_provider('openai')).__name__, type(load_provider('anthropic')).__name__)",
        ],
        tmp_path,
    )  # fmt: skip
    assert where.splitlines()[0].startswith(str(tmp_path / "venv"))  # the installed copy, not the checkout
    assert where.splitlines()[1] == "OpenAIProvider AnthropicProvider"  # found through entry points

    (tmp_path / "run").mkdir()
    out = _run([python, ROOT / "examples" / "build_and_deploy.py"], tmp_path / "run", timeout=120)
    assert "approving as ops-lead" in out and "approved_by='ops-lead'" in out
    assert (tmp_path / "run" / "agentflow.db").exists()
