"""The edge install stays small: no heavy framework is imported or pulled in by `edgefed[edge]`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

FORBIDDEN = ("torch", "transformers", "optimum", "flwr", "fastapi", "sqlalchemy", "peft")


def test_importing_common_and_edge_loads_no_heavy_framework() -> None:
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import edgefed.common, edgefed.edge
        # The optional training modules (edgefed[edge-train]) are heavy on purpose; nothing
        # else may import them (import-linter's contract) or anything heavy.
        # (walk_packages would import them to look inside, hence the walk by hand)
        optional = {"edgefed.common.training", "edgefed.edge.training"}
        def walk(package):
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if info.name not in optional:
                    module = importlib.import_module(info.name)
                    if info.ispkg:
                        walk(module)
        walk(edgefed.common)
        walk(edgefed.edge)
        forbidden = {FORBIDDEN!r}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
        print(",".join(loaded))
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout.strip()}"


def dependency_closure(root: str, extras: frozenset[str]) -> set[NormalizedName]:
    """Installed distributions that ``pip install root[extras]`` pulls in, transitively."""
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    names: set[NormalizedName] = set()
    todo = [(canonicalize_name(root), extras)]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        names.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(
                f"{name} is required (by the edge closure) but not installed; "
                "install the dev environment (`pip install -e .[dev]`)"
            ) from None
        environments = [{"extra": ""}] + [{"extra": e} for e in sorted(wanted)]
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names - {canonicalize_name(root)}


def test_edge_extra_pulls_in_no_heavy_framework() -> None:
    closure = dependency_closure("edgefed", frozenset({"edge"}))

    pulled = sorted(closure & {canonicalize_name(n) for n in FORBIDDEN})

    assert pulled == [], f"edgefed[edge] pulls in {pulled}"


def test_edge_closure_holds_the_edge_runtime_and_mqtt_client() -> None:
    closure = dependency_closure("edgefed", frozenset({"edge"}))

    assert {"onnxruntime", "paho-mqtt", "httpx", "pydantic"} <= closure


def test_closure_walk_sees_heavy_frameworks_where_they_are_wanted() -> None:
    closure = dependency_closure("edgefed", frozenset({"edge-train"}))

    assert {"torch", "flwr", "onnxruntime"} <= closure


def test_console_script_edgefed_is_installed() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts")

    entry = next((ep for ep in scripts if ep.name == "edgefed"), None)

    assert entry is not None
    assert entry.value == "edgefed.cli:main"


def test_every_source_folder_is_a_package_so_wheels_include_it() -> None:
    root = Path(__file__).resolve().parent.parent
    missing = [
        str(folder.relative_to(root))
        for top in ("common", "cloud", "edge", "simulation")
        for folder in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]
        if "__pycache__" not in folder.parts
        and any(folder.glob("*.py"))
        and not (folder / "__init__.py").exists()
    ]
    assert missing == [], f"folders without __init__.py (left out of the wheel): {missing}"
