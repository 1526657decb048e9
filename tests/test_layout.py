"""The package layout: one import name (`ferry.*`), rooms that import only the rooms below them
(import-linter contracts in pyproject.toml), a torch-free runtime, an installed wheel that works
on its own (`ferry bench` from an empty folder), and `python -m ferry` working like the `ferry` command."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ferry


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_bare_stage_imports_anywhere():
    """No file of the project (tests included) imports the stage folders by their folder names."""
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in REPO.glob("*/**/*.py")
                 if ".venv" not in p.parts and "build" not in p.parts
                 for m in _imports(p) if m.split(".")[0] in ("runtime", "train", "export", "benchmarks")]
    assert not offenders, offenders


def test_every_library_the_code_imports_is_a_base_dependency_or_names_its_extra():
    """A missing optional library is one line naming the extra that installs it (`ferry.cli`): every
    module beyond the standard library that ferry's code imports is numpy, pillow or in
    `EXTRA_OF`, and each extra named there is one of pyproject.toml's."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from ferry.cli import EXTRA_OF

    where: dict[str, str] = {}
    for folder in ("train", "export", "runtime", "benchmarks", "ferry"):
        for path in (REPO / folder).rglob("*.py"):
            for name in _imports(path):
                where.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    # fsspec: ferry.batch.storage catches its absence itself and names the package for the scheme
    base = {"ferry", "numpy", "PIL", "fsspec"}
    unnamed = {top: path for top, path in where.items()
               if top not in sys.stdlib_module_names and top not in base and top not in EXTRA_OF}
    assert not unnamed, unnamed
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras), set(EXTRA_OF.values()) - set(extras)
    assert {"prometheus_client", "obstore", "faster_coco_eval", "openvino"} <= set(EXTRA_OF)  # the scan reaches them


def test_a_missing_library_is_one_line_naming_its_extra(monkeypatch, capsys):
    """A command that needs a library that is not installed exits 2 with one line naming the extra;
    a module ferry does not know of stays the ModuleNotFoundError it is."""
    import types

    import ferry.cli

    command = types.ModuleType("ferry_test_command")
    command.add_arguments = lambda parser: parser.add_argument("module")
    command.run = lambda args: importlib.import_module(args.module)
    monkeypatch.setitem(sys.modules, "ferry_test_command", command)
    monkeypatch.setitem(ferry.cli.COMMANDS, "needs", ("ferry_test_command", "imports a module"))
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    assert ferry.cli.main(["needs", "prometheus_client.multiprocess"]) == 2
    err = capsys.readouterr().err
    assert err == "ferry needs: error: needs the Python package 'prometheus_client'; install it with: pip install 'ferry[serve]'\n"
    with pytest.raises(ModuleNotFoundError):
        ferry.cli.main(["needs", "ferry_no_such_library"])


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """ferry built as a wheel (from the files git knows, as a clean clone has them) and installed
    into a fresh virtual environment, which borrows only the third-party packages of this one
    (numpy, pillow, onnxruntime, torch): (its python, its site-packages, the wheel)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(root / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next((root / "dist").glob("ferry-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _site_packages(python)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site, wheel


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_the_wheel_exposes_only_ferry_and_ships_its_data(installed_wheel, tmp_path):
    """Not editable: `import runtime` (and train, export, benchmarks) fails, `from ferry.runtime import
    Classifier` works, every module imports, and the package data (samples, labels) is inside."""
    python, site, _ = installed_wheel
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name not in ("__pycache__", "bin"))
    assert installed == ["ferry"], installed

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_clean_env())

    for name in ("runtime", "train", "export", "benchmarks"):
        proc = run(f"import {name}")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (name, proc.stdout, proc.stderr)
    proc = run("import ferry, ferry.runtime; from ferry.runtime import Classifier; print(ferry.__file__, Classifier.__module__)")
    assert proc.returncode == 0, proc.stderr
    assert str(site) in proc.stdout and "ferry.runtime.classifier" in proc.stdout
    walk = ("import pkgutil, importlib, ferry\n"
            "names = [m.name for m in pkgutil.walk_packages(ferry.__path__, 'ferry.') if not m.name.endswith('__main__')]\n"
            "for n in names:\n    importlib.import_module(n)\n"
            "print(len(names), sorted({n.split('.')[1] for n in names}))")
    proc = run(walk)
    assert proc.returncode == 0, proc.stderr
    assert all(f"'{room}'" in proc.stdout for room in ("runtime", "bench", "app", "models"))
    data = ("from ferry.core.samples import sample_photos, sample_digits\n"
            "from ferry.models.tvmodels import simple_imagenet_labels\n"
            "print(len(sample_photos()), len(sample_digits()), simple_imagenet_labels()[268])")
    proc = run(data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "4", "Mexican", "hairless", "dog"]


@pytest.mark.slow
def test_import_contracts_hold_and_catch_a_broken_room(installed_wheel, tmp_path):
    """import-linter's contracts (pyproject.toml) hold on the installed package, where every room is a
    folder of ferry/; and they are not toothless: a runtime that imports torch and an export that
    imports train, planted in a copy, break the contracts that forbid them."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install 'ferry[dev]')")
    _, site, _ = installed_wheel

    def check(package_root: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"], capture_output=True, text=True,
                              cwd=tmp_path, env={**_clean_env(), "PYTHONPATH": str(package_root)})

    proc = check(site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    broken = tmp_path / "broken"
    shutil.copytree(site / "ferry", broken / "ferry")
    with open(broken / "ferry" / "runtime" / "images.py", "a") as f:
        f.write("\nimport torch  # planted\n")
    with open(broken / "ferry" / "export" / "triton.py", "a") as f:
        f.write("\nfrom ferry.train import loop  # planted\n")
    proc = check(broken)
    assert proc.returncode != 0
    assert "ferry.runtime is not allowed to import torch" in proc.stdout
    assert "ferry.export.triton -> ferry.train.loop" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_bench_runs_from_the_installed_wheel_in_an_empty_folder(installed_wheel, cnn_export, tmp_path):
    """`ferry bench` from the wheel, in a folder with nothing in it: no checkout, no samples/ beside it
    (the runtime-overhead row reads the photo shipped in the package); a GPU backend is skipped with
    its reason."""
    python, _, _ = installed_wheel
    path, _ = cnn_export
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(python), "-m", "ferry", "bench", "--models-dir", str(path.parent), "--models", "mnist-cnn",
                           "--backends", "ort-cpu-fp32", "torch-eager-cpu", "ort-cuda-fp32", "--quick", "--out", "out"],
                          capture_output=True, text=True, cwd=empty, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((empty / "out" / "results.json").read_text())
    assert {r["backend"] for r in results["rows"]} == {"ort-cpu-fp32", "torch-eager-cpu"}
    assert [s["backend"] for s in results["skipped"]] == ["ort-cuda-fp32"]
    assert results["overhead"] and results["overhead"][0]["model"] == "mnist-cnn"
    assert (empty / "out" / "report.md").exists()


def test_python_m_ferry_works_like_the_command():
    script = Path(sys.executable).parent / "ferry"
    if not script.exists():
        pytest.skip("the `ferry` console script is not installed in this environment")
    via_m = run_ferry("--help")
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert via_m.returncode == via_script.returncode == 0
    assert via_m.stdout.replace("__main__.py", "ferry") == via_script.stdout.replace("__main__.py", "ferry")
    for command in ("train", "export", "predict", "draw", "bench"):
        assert command in via_m.stdout
