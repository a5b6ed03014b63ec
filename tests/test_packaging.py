"""The installed import names: a module that shadows one of this project's packages fails at import, by
name, instead of deep inside with an AttributeError (issue #12 item 7)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_in(directory, statement):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), ROOT]), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", statement], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("shadow", ["package", "module", "namespace folder"])
def test_a_shadowing_layers_is_named(tmp_path, shadow):
    if shadow == "package":
        (tmp_path / "layers").mkdir()
        (tmp_path / "layers" / "__init__.py").write_text("MINE = 1\n")
    elif shadow == "module":
        (tmp_path / "layers.py").write_text("MINE = 1\n")
    else:
        (tmp_path / "layers").mkdir()                     # no __init__.py: a namespace portion
    result = _import_in(tmp_path, "import experiments.models")
    if shadow == "namespace folder" and result.returncode == 0:
        return                                            # our regular package won over the namespace portion
    assert result.returncode != 0
    assert "ImportError: the module 'layers' imported from" in result.stderr
    assert "is not memory-by-design's" in result.stderr and "rename your own 'layers'" in result.stderr


def test_without_a_shadow_the_packages_import(tmp_path):
    result = _import_in(tmp_path, "import experiments.models, experiments.unification; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
