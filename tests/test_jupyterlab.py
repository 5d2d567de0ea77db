"""JupyterLab opens the repository and lists the notebooks; the pipelines' parameters are tagged for papermill."""
import json, os, secrets, signal, socket, subprocess, sys, tempfile, time, urllib.error, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted(p for p in (ROOT / 'nbs' / 'pipelines').glob('*.ipynb') if not p.name.startswith('_'))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _get(url, timeout=5):
    "(status, body) of a GET; (None, reason) while the server is not up yet."
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read().decode('utf-8', 'replace')
    except urllib.error.HTTPError as e: return e.code, ''
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e: return None, str(e)


@pytest.fixture
def jupyter_lab():
    port, token = _free_port(), secrets.token_hex(16)
    home = tempfile.mkdtemp(prefix='jlab-test-')  # settings, runtime files and workspaces stay out of the repo
    env = {**os.environ, 'JUPYTER_RUNTIME_DIR': f'{home}/runtime', 'JUPYTERLAB_WORKSPACES_DIR': f'{home}/ws',
           'JUPYTER_CONFIG_DIR': f'{home}/config'}
    log = open(Path(home) / 'lab.log', 'w+')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--allow-root', '--no-browser', '--ip', '127.0.0.1',
                             f'--port={port}', '--port-retries=0', f'--ServerApp.token={token}',
                             f'--ServerApp.root_dir={ROOT}', '--ServerApp.open_browser=False'],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            status, _ = _get(f'{base}/api/status?token={token}')
            if status == 200: break
            time.sleep(0.5)
        if status != 200:
            log.seek(0)
            pytest.fail(f'JupyterLab did not answer /api/status within 120 s (exit {proc.poll()}):\n{log.read()[-3000:]}')
        yield base, token
    finally:
        proc.terminate()
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
        log.close()


def test_jupyterlab_serves_the_notebooks(jupyter_lab):
    base, token = jupyter_lab
    status, body = _get(f'{base}/lab?token={token}', timeout=30)
    assert status == 200 and 'JupyterLab' in body
    status, body = _get(f'{base}/api/contents/nbs?token={token}', timeout=30)
    assert status == 200
    listed = {c['name'] for c in json.loads(body)['content'] if c['type'] == 'notebook'}
    on_disk = {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}
    assert {'index.ipynb', '00_core.ipynb'} <= listed and listed == on_disk
    status, body = _get(f'{base}/api/contents/nbs/00_core.ipynb?token={token}', timeout=30)
    assert status == 200 and json.loads(body)['content']['cells']
    assert _get(f'{base}/api/status')[0] == 403, 'the server must refuse requests without the token'


def test_pipeline_parameters_are_tagged():
    "Each pipeline has exactly one code cell tagged `parameters` (papermill, JupyterLab's property inspector)."
    import nbformat
    assert PIPELINES, 'nbs/pipelines/ holds no pipeline notebook'
    for path in PIPELINES:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1, f'{path.relative_to(ROOT)}: {len(tagged)} cells tagged "parameters", expected 1'
        cell = tagged[0]
        assert cell.cell_type == 'code' and cell.source.strip(), f'{path.relative_to(ROOT)}: empty parameters cell'
        compile(cell.source, str(path), 'exec')  # papermill injects after it: it must be plain assignments


def test_papermill_reads_every_parameter(caplog):
    "papermill's inspection names every assignment of each parameters cell, without 'Unable to parse' warnings."
    import ast, logging
    import papermill as pm, nbformat
    for path in PIPELINES:
        cell = next(c for c in nbformat.read(path, as_version=4).cells if 'parameters' in c.metadata.get('tags', []))
        assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='papermill'):
            found = set(pm.inspect_notebook(str(path)))
        assert found == assigned, f'{path.relative_to(ROOT)}: papermill sees {sorted(found)}, the cell assigns {sorted(assigned)}'
        assert not [r for r in caplog.records if 'Unable to parse' in r.getMessage()], \
            f'{path.relative_to(ROOT)}: papermill cannot parse {[r.getMessage() for r in caplog.records]}'
