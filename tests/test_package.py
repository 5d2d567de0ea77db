"""The generated package compiles cleanly: no SyntaxWarning (Python 3.12 warns on invalid escapes such as LaTeX in docstrings)."""
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'radiodiff_vae'


@pytest.mark.parametrize('path', sorted(PACKAGE.glob('*.py')), ids=lambda p: p.name)
def test_module_compiles_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        compile(path.read_text(encoding='utf-8'), str(path), 'exec')
