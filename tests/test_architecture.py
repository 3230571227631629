"""The layout's rules, checked: policies use only the policy interface and public token fields.

The engine (admission, routing, settlement, workers), the lanes and the
policies are separate places. A policy may import the hook interface, the
vocabulary (errors, states, tags), helpers (fingerprint, metrics, clock) and
the quarantine's store; never the engine or the lanes, and never a token's or
the coordinator's private fields. The core never imports the FastAPI
integration.
"""

from __future__ import annotations

import ast
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "tokengate" / "policies").glob("*.py"))
ENGINE = {"coordinator", "_coordinator_base", "_admission", "_settlement", "_plan", "routing", "worker", "lanes"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            module = node.module or ""
            if node.level == 2 or (node.level == 1 and path.parent.name == "tokengate"):
                names.add(module.split(".")[0] if module else "")
                if not module:
                    names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokengate."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tokengate."))
    return names


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policies_never_import_the_engine_or_the_lanes(path: Path) -> None:
    assert not (_imports(path) & ENGINE), f"{path.name} imports {_imports(path) & ENGINE}"


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policies_read_no_private_token_or_coordinator_fields(path: Path) -> None:
    # Code only: comments may name engine internals to explain an interaction.
    with path.open("rb") as f:
        text = " ".join(t.string for t in tokenize.tokenize(f.readline) if t.type != tokenize.COMMENT)
    private = re.findall(r"\b(?:token|coordinator|self\._coordinator)\._[a-z]\w*", text)
    assert not private, f"{path.name} reads private fields: {sorted(set(private))}"


def test_the_core_never_imports_fastapi() -> None:
    for path in (ROOT / "tokengate").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(fastapi|starlette|tokengate_fastapi)\b", text, re.M), path
