"""The package layout: one import name (`ferry.*`), rooms that import only the rooms below them, a
torch-free runtime, and `python -m ferry` working like the `ferry` command."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ferry

# room -> (folder, first-party rooms it may import, third-party top-level modules it may import)
STDLIB = set(sys.stdlib_module_names)
ROOMS: dict[str, tuple[str, set[str], set[str]]] = {
    "ferry.core": ("ferry/core", set(), {"numpy"}),
    "ferry.runtime": ("runtime", {"ferry.core"}, {"numpy", "PIL", "onnxruntime"}),
    "ferry.app": ("ferry/app", {"ferry.core", "ferry.runtime"}, {"numpy", "PIL"}),
    "ferry.train": ("train", {"ferry.core", "ferry.runtime"},
                    {"numpy", "PIL", "torch", "torchvision", "tqdm", "matplotlib", "skimage", "scipy"}),
    "ferry.export": ("export", {"ferry.core", "ferry.runtime", "ferry.train"},
                     {"numpy", "PIL", "torch", "torchvision", "onnx", "onnxruntime", "google", "tritonclient"}),
    "ferry.cluster": ("ferry/cluster.py", {"ferry.core"}, {"ray"}),
    "ferry.batch": ("ferry/batch", {"ferry.core", "ferry.runtime", "ferry.cluster"}, {"numpy", "ray", "pyarrow"}),
    "ferry.serve": ("ferry/serve", {"ferry.core", "ferry.runtime", "ferry.cluster"}, {"numpy", "starlette", "uvicorn", "ray"}),
    "ferry.bench": ("benchmarks", {"ferry.core", "ferry.runtime", "ferry.app", "ferry.train", "ferry.export", "ferry.batch",
                                   "ferry.serve", "ferry.cluster"},
                    {"numpy", "PIL", "torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "pytest", "skimage",
                     "aiohttp", "starlette", "uvicorn", "ray", "pyarrow"}),
}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ferry" and len(parts) > 1 else None


@pytest.mark.parametrize("room", list(ROOMS))
def test_each_room_imports_only_what_it_may(room):
    folder, rooms, third_party = ROOMS[room]
    problems = []
    files = [REPO / folder] if folder.endswith(".py") else sorted((REPO / folder).glob("*.py"))
    for path in files:
        for module in _imports(path):
            top = module.split(".")[0]
            if top in ("runtime", "train", "export", "benchmarks", "tests"):
                problems.append(f"{path.name}: imports {module!r} outside the ferry namespace")
            elif top == "ferry":
                other = _room_of(module)
                if other and other != room and other not in rooms:
                    problems.append(f"{path.name}: {room} may not import {module}")
            elif top not in STDLIB and top != "__future__" and top not in third_party:
                problems.append(f"{path.name}: {room} may not import the third-party module {module}")
    assert not problems, "\n".join(problems)


def test_no_bare_stage_imports_anywhere():
    """No file of the project (tests included) imports the stage folders by their folder names."""
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in REPO.glob("*/**/*.py")
                 if ".venv" not in p.parts and "build" not in p.parts
                 for m in _imports(p) if m.split(".")[0] in ("runtime", "train", "export", "benchmarks")]
    assert not offenders, offenders


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.mark.slow
def test_non_editable_install_exposes_only_ferry(tmp_path):
    """`pip install .` (not editable) into a fresh virtual environment: `import runtime` (and train,
    export, benchmarks) fails, `from ferry.runtime import Classifier` works, every module imports."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _site_packages(python)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name not in ("__pycache__", "bin"))
    assert installed == ["ferry"], installed
    # the test environment's third-party packages (numpy, pillow, onnxruntime, torch), not its ferry
    deps = sysconfig.get_paths()["purelib"]
    (site / "deps.pth").write_text(deps + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)

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
    assert "'runtime'" in proc.stdout and "'bench'" in proc.stdout and "'app'" in proc.stdout


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
