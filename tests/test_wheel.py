"""The wheel: ``python -m build --wheel`` makes one that holds every package (filters/pallas too), installs
into a fresh virtual environment and runs the unification experiment from there (slow: about a minute).

The build runs as ``python -m build`` does by default, in an isolated environment that pip fills with the
build backend of pyproject.toml (from the package index). The virtual environment sees this interpreter's
packages (``--system-site-packages``: jax, flax, ...) but the project only from the wheel: the test checks
that the modules it imports come from there.
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("designmodels", "filters", "layers", "configs", "experiments")   # pyproject.toml's packages.find


def _run(command, **kwargs):
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert run.returncode == 0, f"{' '.join(map(str, command))} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _source_modules() -> set:
    """Every module file of the packages, as wheel paths (``filters/pallas/delta_rule.py``)."""
    found = set()
    for package in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            found.add(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return found


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_environment_and_runs_the_unification_experiment(tmp_path):
    pytest.importorskip("build", reason="the build frontend comes with the test extra: pip install -e '.[test]'")
    # build from a copy of what the wheel is made of, so that the build leaves nothing in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for package in PACKAGES:
        shutil.copytree(os.path.join(ROOT, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(source)])
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))

    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"the wheel lacks {missing}"
    assert "filters/pallas/__init__.py" in names and "layers/nnx.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = str(venv / "bin" / "python")
    # --force-reinstall: this interpreter may already see the project (an editable install of a checkout)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
          "--force-reinstall", wheel])
    work = tmp_path / "work"          # outside the checkout: nothing is imported from it
    work.mkdir()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    where = _run([python, "-c", "import os, configs, filters.pallas, layers.nnx; "
                                "print(os.path.dirname(configs.__file__)); print(filters.pallas.__file__)"],
                 cwd=work, env=env).split()
    for path in where:
        assert os.path.realpath(path).startswith(os.path.realpath(venv)), f"imported from {path}, not the wheel"
    out = _run([python, "-m", "experiments.unification", f"--config={where[0]}/unification.py", "--config.smoke=True",
                "--config.models=('gated_deltanet','bayesian')", "--config.backends=('sequential','chunked')",
                "--config.shapes=((2,9,2,4,3),)",
                f"--workdir={work / 'unification'}"], cwd=work, env=env)
    assert (work / "unification" / "results.json").exists()
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and all(line.count("exact") == 2 for line in rows), out
