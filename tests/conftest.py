"""Where the upstream-golden files are, for every test that needs them, and what a missing one means.

One rule: `$RADIODIFF_SHARED` if set, else the folder `shared` beside the repository (`../shared` from its root).
A missing golden file skips the test on a developer's machine, and FAILS it in CI (`CI=true`), so a CI run that
lost its golden files cannot pass by skipping the comparisons with upstream.
"""
import os
from pathlib import Path

import pytest

from radiodiff_vae.core import shared_dir   # the one rule, shared with the notebooks

pytest_plugins = ['pytester']


def in_ci() -> bool:
    "Whether this is a CI run (CI=true, as CI services set it)."
    return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


def require_golden(*parts) -> Path:
    "The golden file shared_dir()/parts; skip the test when it is missing, fail it when in CI."
    path = shared_dir().joinpath(*parts)
    if path.is_file(): return path
    msg = f'golden file {path} not found (set RADIODIFF_SHARED to the folder that holds golden/)'
    if in_ci(): pytest.fail(f'{msg}; CI=true: a missing golden file is a failure, not a skip', pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope='session')
def golden_path():
    "`golden_path('golden', 'small.pt')`: the path of a golden file (skip if missing; fail in CI)."
    return require_golden
