"""Only tests marked `gpu` are skipped without a GPU: not every test whose name or parameter says gpu."""
import subprocess
import sys

import torch

from conftest import ROOT

CHECKED = '''
import pytest

@pytest.mark.gpu
def test_marked():
    pass

@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_a_pool(pool):
    pass

def test_the_smallest_gpu_that_fits():
    pass
'''
CONFTEST = '''
import importlib.util

spec = importlib.util.spec_from_file_location("project_conftest", %r)
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
pytest_collection_modifyitems = project.pytest_collection_modifyitems
'''


def test_only_the_gpu_mark_skips(tmp_path):
    (tmp_path / "test_checked.py").write_text(CHECKED)
    (tmp_path / "conftest.py").write_text(CONFTEST % str(ROOT / "tests" / "conftest.py"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True)
    expected = "4 passed" if torch.cuda.is_available() else "3 passed, 1 skipped"
    assert expected in result.stdout, result.stdout + result.stderr
    assert torch.cuda.is_available() or "test_checked.py::test_marked SKIPPED" in result.stdout
