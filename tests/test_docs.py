"""The docs site: README generation, the notebook-to-page converter, and the built site in a headless browser.

The browser test builds the site once per session with `python docs/build_docs.py --reuse-executed` (a notebook runs
in a fresh kernel unless build/docs/executed/ holds a copy executed from the same cells: after the README's test
command, `python docs/nbdev_test_keep.py`, it holds nbdev_test's run of every notebook), serves site/ on 127.0.0.1
and drives Debian's Chromium through selenium + chromedriver. On every page it checks the title, images, links and
what a reader must not see (PAGE_CHECKS_JS: TeX left as text, maths cut off or wider than its column, Markdown
lists left as text). Screenshots go to $DOCS_SCREENSHOTS (default build/docs/screenshots/).
"""
import base64, functools, http.server, importlib.util, json, os, re, shutil, socket, subprocess, sys, tempfile
import threading, time, urllib.error, urllib.parse, urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / 'site'


def _load_builder():
    spec = importlib.util.spec_from_file_location('build_docs', ROOT / 'docs' / 'build_docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


bd = _load_builder()


# ------------------------------------------------------------------ fast tests
def test_readme_is_the_index_notebook():
    "README.md is exactly nbs/index.ipynb after nbdev's processing (regenerate with `make readme`)."
    expected = bd.build_readme(out=None)
    actual = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert actual == expected, 'README.md differs from nbs/index.ipynb: run `make readme`'
    assert expected.startswith('# ') and 'DO NOT EDIT' in expected



TUNING_RESULTS = ROOT / 'benchmarks' / 'results' / 'quickstart_tuning.json'


def _paired_gain(a: str, b: str, seeds, maps: str):
    "Mean and 95% t interval of arm a minus arm b, paired by seed (EMA PSNR, dB), from the committed tuning results."
    from scipy import stats
    import numpy as np
    q = json.loads(TUNING_RESULTS.read_text())
    score = ((lambda arm, s: q['search'][arm]['runs'][str(s)]['psnr_ema']) if maps == 'held-out' else
             (lambda arm, s: q['real'][arm][str(s)]['ema']))
    d = np.array([score(a, s) - score(b, s) for s in seeds])
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f'{d.mean():.2f} dB [{d.mean() - h:+.2f}, {d.mean() + h:+.2f}]'


def test_tuning_gains_carry_their_baseline_interval_and_selection_story():
    "The tuning's gains in the README and QUICKSTART_TUNING.md recompute from the committed results with their intervals; the real maps' role across rounds is told."
    readme = (ROOT / 'README.md').read_text(encoding='utf-8').replace('\u2212', '-')
    tuning = (ROOT / 'benchmarks' / 'QUICKSTART_TUNING.md').read_text(encoding='utf-8')
    round9 = _paired_gain('bf16_b2_1188_f192b1x108', 'fp32_b2_858_f192b1x108', range(6), 'held-out')  # over the fp32 config it replaced
    round7 = _paired_gain('fp32_b2_900_f128x150', 'fp32_b2_1200_gan960', range(3), 'held-out')
    round8 = _paired_gain('fp32_b2_858_f192b1x108', 'fp32_b2_900_f128x150', range(6), 'held-out')
    round8_real = _paired_gain('fp32_b2_858_f192b1x108', 'fp32_b2_900_f128x150', range(6), 'real')
    real9 = _paired_gain('bf16_b2_1188_f192b1x108', 'fp32_b2_858_f192b1x108', range(6), 'real')
    assert (round9, round7, round8, round8_real, real9) == (
        '0.80 dB [+0.55, +1.06]', '0.68 dB [-1.60, +2.96]', '0.43 dB [+0.13, +0.73]', '0.02 dB [-0.35, +0.40]', '0.97 dB [+0.57, +1.37]')
    for text, name in ((readme, 'README.md'), (tuning, 'QUICKSTART_TUNING.md')):
        for gain in (round9, real9, '0.68 dB [-1.60, +2.96]'):
            assert gain in text, f'{name} lacks {gain}'
    assert '0.43 dB [+0.13, +0.73]' in readme and '+0.02 dB [-0.35, +0.40]' in readme
    main_job = json.loads((ROOT / 'benchmarks' / 'results' / 'main_job.json').read_text())['real_maps_native_256']
    lo, hi = main_job['psnr_ema_ci']
    assert f'[{lo:.1f}, {hi:.1f}]' in readme and f'[{lo:.2f}, {hi:.2f}]' in tuning
    assert 'met on these 26 maps' in readme and 'met on the 26 bundled real maps' in tuning   # scoped, not "30 dB met"
    assert 'rounds 1, 5 and 9' in readme and 'decided the precision three times' in tuning
    assert 'whatever its interval' in readme and 'whatever its interval' in tuning          # the bf16 rule actually applied
    assert 'the real maps scored only afterwards. Three' not in readme
    assert 'faithful stand-in for the real ones' not in tuning


def test_results_lead_with_the_like_for_like_speed_and_name_each_comparison():
    "RESULTS.md is its renderer's output; its first section is our step against upstream's loop on one GPU, and every ratio to the original run says it is not like for like."
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    try: import run_all
    finally: sys.path.remove(str(ROOT / 'benchmarks'))
    md = (ROOT / 'benchmarks' / 'RESULTS.md').read_text(encoding='utf-8')
    assert md == run_all.render(run_all.RESULTS_DIR), 'RESULTS.md is stale: python benchmarks/run_all.py --render'
    on = json.loads((ROOT / 'benchmarks' / 'results' / 'gpu.json').read_text())['full']['timing']['gan_on']['variants']
    ours, upstream = 3600 / on['ours']['median_s'], 3600 / on['upstream']['median_s']
    first_section = md.split('\n## ')[1]
    assert first_section.startswith('Speed on a GPU, like for like first')
    assert f'{ours:,.0f} / {upstream:,.0f} steps/h = **{ours / upstream:.2f}×**' in first_section.split('\n- ')[1]
    assert f'{ours / upstream:.2f}' == '1.22'
    for line in md.splitlines():
        if 'original run' in line: assert 'not like for like' in line, line

def _png_1x1():
    return base64.b64encode(bytes.fromhex(
        '89504e470d0a1a0a0000000d4948445200000001000000010806000000'
        '1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5e36d0a0000000049454e44ae426082')).decode()


def test_converter_renders_directives_outputs_and_links():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_raw_cell('---\ntitle: Demo\ndescription: A demo page\noutput-file: demo.html\n---\n'),
        nbformat.v4.new_markdown_cell(f'See [`f`]({bd.doc_prefix()}core.html#f) and [the model](07_model.ipynb#top).'),
        nbformat.v4.new_code_cell('#| echo: false\n#| output: asis\nshow_doc(f)', outputs=[
            nbformat.v4.new_output('execute_result', data={'text/markdown': '---\n\n### f\n\n>      f (x)\n\n*Doc.*',
                                                            'text/plain': '<...>'}, execution_count=1)]),
        nbformat.v4.new_code_cell('print("a")', outputs=[nbformat.v4.new_output('stream', name='stdout',
                                                                                text='10%\r50%\r100%\ndone\n')]),
        nbformat.v4.new_code_cell('plot()', outputs=[nbformat.v4.new_output('display_data', data={
            'image/png': _png_1x1(), 'text/plain': '<Figure size 10x10 with 1 Axes>'})]),
        nbformat.v4.new_code_cell('#| include: false\nsecret()'),
        nbformat.v4.new_code_cell('#| output: false\nnoisy()', outputs=[nbformat.v4.new_output('stream', name='stdout', text='noise')]),
    ]
    conv = bd.Converter({'07_model.ipynb': 'model.md'})
    md, files = conv.convert(nb, 'pipelines/demo.md')
    assert md.startswith('# Demo\n') and '> A demo page' in md
    assert '(../core.html#f)' in md and '(../model.html#top)' in md and bd.doc_prefix() not in md
    assert 'show_doc' not in md and '### f { #f }' in md          # echo: false hides the call, asis keeps the doc
    assert '100%\ndone' in md and '10%' not in md                 # carriage returns as a terminal shows them
    assert 'secret' not in md and 'noise' not in md and 'noisy()' in md
    (name, data), = files.items()
    assert name == 'demo_files/cell4_out0.png' and data.startswith(b'\x89PNG') and f']({name})' in md
    assert bd.page_name(Path('07_model.ipynb'), {}) == 'model.md'
    assert bd.page_name(Path('index.ipynb'), {'output-file': 'index.html'}) == 'index.md'


def test_title_cells_hold_only_title_and_summary():
    "nbdev turns the `# Title` cell into front matter and drops the rest of that cell: nothing may be lost there."
    lost = {str(r): bd.title_cell_dropped_lines(bd.NBS / r) for r in bd.find_notebooks()}
    lost = {k: f'{len(v)} lines, from {v[0]!r}' for k, v in lost.items() if v}
    assert not lost, f'text after the title and `> summary` that nbdev drops (move it to the next cell): {lost}'


def test_links_to_repository_files():
    "Relative links to repository files: images are copied into the site, other files point at git_url."
    conv = bd.Converter({'00_core.ipynb': 'core.md'}); conv.base = ROOT
    md = conv.links('![f](docs/mkdocs.yml) ![p](nope.png) [t](tests/test_docs.py) [c](00_core.ipynb#x)', 0)
    git = bd.settings()['git_url']
    assert f'[t]({git}/blob/main/tests/test_docs.py)' in md and '[c](core.html#x)' in md and '![p](nope.png)' in md
    assert conv.assets == set()
    png = next((p for p in (ROOT / 'nbs').rglob('*.png')), None) or next(ROOT.glob('reports/reference_run/*.png'), None)
    if png is not None:
        rel = png.relative_to(ROOT).as_posix()
        assert conv.links(f'![x]({rel})', 1) == f'![x](../{rel})' and conv.assets == {rel}


def test_display_math_in_lists_becomes_inline_display_style():
    fix = bd.Converter.display_math
    assert fix('* KL:\n  $$a+b$$\n') == '* KL:\n  $\\displaystyle a+b$\n'
    assert '\n\n$$\nx\n$$\n\n' in fix('text\n$$\nx\n$$\nmore')   # a block needs blank lines around it
    assert fix('`$$a$$` and\n```\n$$b$$\n```\n') == '`$$a$$` and\n```\n$$b$$\n```\n'  # code untouched


def test_markdown_reads_as_in_jupyter():
    "Lists and tables right after a paragraph line, 2-space nested lists and `$ x $` render as Jupyter shows them."
    md = bd.Converter({}).site_markdown
    assert md('Kept:\n* a\n* b\n  more\n* c') == 'Kept:\n\n* a\n* b\n  more\n* c'
    assert md('x:\n- a\n  - nested\n- b') == 'x:\n\n- a\n    - nested\n- b'
    assert md('x\n1. one\n2. two') == 'x\n\n1. one\n2. two' and md('in\n2020. was') == 'in\n2020. was'  # as CommonMark
    assert md('intro\n| a | b |\n|---|---|\n| 1 | 2 |') == 'intro\n\n| a | b |\n|---|---|\n| 1 | 2 |'
    assert md('$f(t) = $ `x`, $ a$, $b$ and \\$5') == '$f(t) =$ `x`, $a$, $b$ and \\$5'
    assert md('`$ x $` and\n```\n$ y $\ntext\n- z\n```') == '`$ x $` and\n```\n$ y $\ntext\n- z\n```'  # code untouched
    assert md('$$\na\n- b\n$$') == '\n\n$$\na\n- b\n$$\n\n'  # a line of maths starting with "- " is no list
    import markdown  # what the site's Markdown engine then makes of a list after a paragraph line
    html = markdown.markdown(md('Details:\n* one\n* two'))
    assert '<p>Details:</p>' in html and html.count('<li>') == 2


def test_defect_links_on_the_site_and_in_the_readme():
    "`[defect N](index.ipynb#upstream-defects)` goes to the home page's table on the site and in README.md."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell('See [defect 2](index.ipynb#upstream-defects) and [13](13_trainer.ipynb).')]
    conv = bd.Converter({'index.ipynb': 'index.md', '13_trainer.ipynb': 'trainer.md'})
    assert '[defect 2](index.html#upstream-defects)' in conv.convert(nb, 'schedules.md')[0]
    assert '[defect 2](../index.html#upstream-defects)' in conv.convert(nb, 'pipelines/train.md')[0]
    readme = bd.Converter({}, readme=True).convert(nb, 'README.md')[0]
    assert '[defect 2](#upstream-defects)' in readme and '[13](nbs/13_trainer.ipynb)' in readme
    index = nbformat.read(bd.NBS / 'index.ipynb', as_version=4)
    assert any(re.search(r'^## Upstream defects\s*$', c.source, flags=re.M) for c in index.cells
               if c.cell_type == 'markdown'), 'nbs/index.ipynb needs the "## Upstream defects" heading the links go to'


def test_notebooks_cite_only_what_a_reader_can_open():
    "Every `defect N` in notebook text links to the home page's table; no citation of files a reader does not have."
    bad = []
    for rel in bd.find_notebooks():
        for i, c in enumerate(nbformat.read(bd.NBS / rel, as_version=4).cells):
            if c.cell_type != 'markdown': continue
            text = re.sub(r'`[^`\n]*`', '', c.source)
            unlinked = re.sub(r'\[defects? \d+\]\((?:index\.ipynb|\.\./index\.ipynb)?#upstream-defects\)', '', text)
            for pattern in (r'\bdefects? \d+', r'REFERENCE\.md', r'\bissues? #?\d+', r'\.\./shared|shared/golden'):
                bad += [f'nbs/{rel} cell {i}: {m.group(0)!r} in "...{text[max(0, m.start() - 40):m.end() + 20]}..."'
                        for m in re.finditer(pattern, unlinked if 'defect' in pattern else text, flags=re.I)]
    assert not bad, 'write [defect N](index.ipynb#upstream-defects); carry facts over in your own words:\n' + '\n'.join(bad)


def test_maths_hook():
    "TeX escapes in text, delimiters after size commands, equations side by side and maths in the table of contents."
    spec = importlib.util.spec_from_file_location('docs_hooks', ROOT / 'docs' / 'hooks.py')
    hooks = importlib.util.module_from_spec(spec); spec.loader.exec_module(hooks)
    assert hooks.tex_fixes(r'\underbrace{a}_{\text{nll\_loss}} + \texttt{min\_lr}') == \
        r'\underbrace{a}_{\text{nll_loss}} + \texttt{min_lr}'
    assert hooks.split_equations(r'a = \frac{1}{2},\qquad b = \text{x \qquad y},\qquad c') == \
        ['a = \\frac{1}{2},', 'b = \\text{x \\qquad y},', 'c']
    assert hooks.split_equations(r'\begin{aligned} a \qquad b \end{aligned}') == [r'\begin{aligned} a \qquad b \end{aligned}']
    class Item:
        def __init__(self, title, children=()): self.title, self.children = title, list(children)
    class Page:
        file = type('F', (), {'src_path': 'x.md'})
        toc = [Item(r'Metrics on maps in \([0, 1]\)', [Item('plain')])]
    html = hooks.on_page_content('<div class="arithmatex">\\[\\text{nll\\_loss} = \\big\\lVert x \\big\\rVert,\\qquad b\\]</div>'
                                 '<p><span class="arithmatex">\\(f(t)\\)</span></p>', Page, {}, None)
    assert html.count('<math') == 3 and 'math-row' in html and '\\' not in html and 'nll_loss' in html and '‖' in html
    assert '<math' in Page.toc[0].title and '\\(' not in Page.toc[0].title and Page.toc[0].children[0].title == 'plain'


def test_notebook_order_and_scratch_notebooks_left_out():
    rels = bd.find_notebooks()
    top = [r for r in rels if not bd.is_pipeline(r)]
    assert top == sorted(top, key=lambda r: r.name) and all(not r.name.startswith('_') for r in rels)
    assert Path('index.ipynb') in rels and Path('00_core.ipynb') in rels


def test_notebooks_run_in_parallel_kernels_and_a_failing_one_stops_the_build(monkeypatch):
    "`--jobs 2` (the default on 2 CPUs): two notebooks run at once, each in its own kernel; every one comes back, and a failing one raises."
    monkeypatch.setitem(sys.modules, 'build_docs', bd)      # the worker processes find the executing function by name
    folder = ROOT / 'build' / 'test-parallel'; shutil.rmtree(folder, ignore_errors=True); folder.mkdir(parents=True)
    monkeypatch.setattr(bd, 'NBS', folder); monkeypatch.setattr(bd, 'EXECUTED', folder / 'executed')
    try:
        for name, code in (('a.ipynb', 'import os, time; time.sleep(2); os.getpid()'), ('b.ipynb', 'import os, time; time.sleep(2); os.getpid()'),
                           ('bad.ipynb', 'raise ValueError("boom")')):
            nb = nbformat.v4.new_notebook(); nb.cells = [nbformat.v4.new_code_cell(code)]; nbformat.write(nb, folder / name)
        t0 = time.time()
        done = dict(bd.execute_all([Path('a.ipynb'), Path('b.ipynb')], set(), 'test', 120, False, jobs=2))
        both = time.time() - t0
        assert set(done) == {Path('a.ipynb'), Path('b.ipynb')} and not any(cached for _, cached, _ in done.values())
        secs = [s for _, _, s in done.values()]
        assert both < sum(secs), (both, secs)                  # at the same time, not one after the other
        pids = {nbformat.read(exe, as_version=4).cells[0].outputs[0]['data']['text/plain'] for exe, _, _ in done.values()}
        assert len(pids) == 2
        with pytest.raises(bd.DocsBuildError, match='bad.ipynb: execution failed'):
            list(bd.execute_all([Path('a.ipynb'), Path('bad.ipynb')], set(), 'other', 120, False, jobs=2))
    finally: shutil.rmtree(folder, ignore_errors=True)


def test_nbdev_test_keep_saves_what_nbdev_test_ran_and_the_docs_build_reuses_it(tmp_path):
    """docs/nbdev_test_keep.py (the README's test command): nbdev's own `test_nb` runs each notebook; one that passes is
    written with its outputs under the key the docs build looks up (flagged cells not run, marked), one that fails is not;
    the command itself (forked workers) leaves copies of real notebooks that the docs build takes as executed."""
    folder, executed = tmp_path / 'nbs', tmp_path / 'executed'
    folder.mkdir()
    cells = {'good.ipynb': [nbformat.v4.new_markdown_cell('# Good\n> A notebook that passes'),
                            nbformat.v4.new_code_cell('x = 6 * 7\nprint("printed", x)'),
                            nbformat.v4.new_code_cell('#| slow\nraise SystemExit("a slow cell ran")'),
                            nbformat.v4.new_code_cell('import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(2, 1)); plt.plot([0, x])')],
             'bad.ipynb': [nbformat.v4.new_code_cell('raise ValueError("boom")')]}
    for name, cs in cells.items():
        nb = nbformat.v4.new_notebook(); nb.cells = cs; nbformat.write(nb, folder / name)
    driver = f"""
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location('keep', {str(ROOT / 'docs' / 'nbdev_test_keep.py')!r})
keep = importlib.util.module_from_spec(spec); spec.loader.exec_module(keep)
import nbdev.test
keep.bd.NBS, keep.bd.EXECUTED = Path({str(folder)!r}), Path({str(executed)!r})
nbdev.test.CaptureShell = keep.KeepingShell
print([nbdev.test.test_nb(keep.bd.NBS / n, skip_flags=['slow'], showerr=False)[0] for n in ('good.ipynb', 'bad.ipynb')])
"""
    r = subprocess.run([sys.executable, '-c', driver], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('[True, False]'), r.stdout + r.stderr
    assert not (executed / 'bad.ipynb').exists()
    kept = nbformat.read(executed / 'good.ipynb', as_version=4)
    code = [c for c in kept.cells if c.cell_type == 'code']
    assert [c.source for c in code] == [c.source for c in cells['good.ipynb'] if c.cell_type == 'code']  # as saved
    assert code[0].outputs[0].text == 'printed 42\n'
    assert code[1].outputs == [] and code[1].metadata.get('docs_skipped')
    assert any('image/png' in o.get('data', {}) for o in code[2].outputs)
    nb = nbformat.read(folder / 'good.ipynb', as_version=4)
    assert kept.metadata['docs_build']['key'] == bd.cache_key(nb, bd.skipped_flags(set()), False, bd.package_digest())[1]
    md, files = bd.Converter({}).convert(kept, 'good.md')
    assert 'printed 42' in md and 'slow cell: not run' in md and len(files) == 1 and 'width="' in md

    r = subprocess.run([sys.executable, str(ROOT / 'docs' / 'nbdev_test_keep.py'), '--path', 'nbs', '--file_glob', '0[01]_*.ipynb'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'Success.' in r.stdout, r.stdout + r.stderr
    for rel in (Path('00_core.ipynb'), Path('01_distributions.ipynb')):
        assert nbformat.read(bd.EXECUTED / rel, as_version=4).metadata['docs_build']['by'] == 'nbdev_test'
        _, cached, _ = bd.execute_notebook(rel, set(), bd.package_digest(), 60, False)
        assert cached, f'the docs build would execute {rel} again'


# ------------------------------------------------------------------ the site in a browser
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _fresh_build():
    "build_info.json of a complete build newer than every notebook, package and docs source, else None."
    f = ROOT / 'build' / 'docs' / 'build_info.json'
    if not f.exists(): return None
    info = json.loads(f.read_text())
    if os.environ.get('DOCS_REUSE') == '1': return info  # developers: reuse whatever was built last
    sources = [*(ROOT / 'nbs').rglob('*.ipynb'), *(ROOT / 'radiodiff_vae').rglob('*.py'), *(ROOT / 'docs').iterdir(),
               ROOT / 'settings.ini']
    if info.get('left_out') or info.get('allow_errors') or f.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        return None
    return info


@pytest.fixture(scope='module')
def built_site():
    info = _fresh_build()
    if info is not None:
        print(f'\nreusing the docs build of {info["seconds"]} s (`make docs`); per notebook (s): {info["timings"]}')
        return info
    t0 = time.time()
    # --reuse-executed: a notebook whose cells are unchanged keeps its executed copy (build/docs/executed/) even if the
    # package changed since, so only edited notebooks run again (a fresh checkout executes all, minutes on 2 cores, unless
    # `python docs/nbdev_test_keep.py` ran first: the README's test command, which keeps nbdev_test's executed copies);
    # what is checked here is the site, not the outputs (`nbdev_test` checks those; `make docs` re-executes all)
    r = subprocess.run([sys.executable, str(ROOT / 'docs' / 'build_docs.py'), '--reuse-executed'], cwd=ROOT, capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, f'docs build failed:\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}'
    info = json.loads((ROOT / 'build' / 'docs' / 'build_info.json').read_text())
    print(f'\ndocs build: {time.time() - t0:.1f} s; per notebook (s): {info["timings"]}')
    return info


@pytest.fixture(scope='module')
def server(built_site):
    handler = functools.partial(QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', _free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True); thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    httpd.shutdown(); httpd.server_close(); thread.join(10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def browser():
    webdriver = pytest.importorskip('selenium.webdriver')
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver_path = shutil.which('chromedriver')
    assert chromium and driver_path, 'install Debian packages chromium and chromium-driver (.ci/run does)'
    profile = tempfile.mkdtemp(prefix='docs-chromium-')
    opts = webdriver.ChromeOptions(); opts.binary_location = chromium
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
                 '--disable-dev-shm-usage', f'--user-data-dir={profile}', '--window-size=1280,900'):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit(); shutil.rmtree(profile, ignore_errors=True)


# What a reader must never see on a page, found in the browser (returns one line per problem):
# TeX left as text (`$`, `\(`, `\[` outside code and maths, including the table of contents and the tab title) or
# TeX commands inside a formula (`nll\_loss`); maths wider than the box that holds it (cut off, or needing a
# scrollbar to be read), at the 1280-px window every page is checked in; Markdown lists, tables or headings that were
# left as paragraph text (a line of a <p> starting with "- ", "* ", "1. ", "|" or "#").
PAGE_CHECKS_JS = r"""
const out = [], TEX = /\$|\\\(|\\\)|\\\[|\\\]/;
const SKIP = 'code, pre, kbd, samp, script, style, math, .nb-output, .nb-html, .nb-error, .md-search';
const short = s => s.replace(/\s+/g, ' ').trim().slice(0, 90);
if (TEX.test(document.title)) out.push(`raw TeX in the page title: ${short(document.title)}`);
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n; (n = walker.nextNode());) {
  if (!TEX.test(n.nodeValue) || n.parentElement.closest(SKIP)) continue;
  const where = n.parentElement.closest('.md-sidebar--secondary') ? 'table of contents'
              : n.parentElement.closest('.md-sidebar--primary') ? 'navigation' : 'text';
  out.push(`raw TeX in the ${where}: ${short(n.parentElement.textContent)}`);
}
for (const c of document.querySelectorAll('code.tex'))
  out.push(`TeX the build could not turn into maths: ${short(c.textContent)}`);
for (const m of document.querySelectorAll('math'))
  if (/\\[A-Za-z_%&#$]/.test(m.textContent)) out.push(`TeX command shown inside a formula: ${short(m.textContent)}`);
const article = document.querySelector('article');
for (const m of article.querySelectorAll('math')) {
  const r = m.getBoundingClientRect();
  if (!r.width || m.closest('table')) continue;   // hidden; tables scroll as a whole
  const box = m.closest('.math-block') || m.parentElement.closest('p, li, dd, td, th, h1, h2, h3, h4, h5, h6, div');
  const b = box.getBoundingClientRect(), cs = getComputedStyle(box), label = short(m.textContent).slice(0, 50);
  if (box.scrollWidth > box.clientWidth + 1)
    out.push(`maths wider than its column (${box.scrollWidth} > ${box.clientWidth} px, overflow-x ${cs.overflowX}): ${label}`);
  else if (r.right > b.right + 1 || r.left < b.left - 1)
    out.push(`maths sticks out of its column (${Math.round(r.left)}..${Math.round(r.right)} outside ${Math.round(b.left)}..${Math.round(b.right)} px): ${label}`);
  if (box.scrollHeight > box.clientHeight + 1 && cs.overflowY !== 'visible')
    out.push(`maths cut off at the top or bottom (${box.scrollHeight} > ${box.clientHeight} px, overflow-y ${cs.overflowY}): ${label}`);
}
for (const p of article.querySelectorAll('p')) {
  if (p.closest(SKIP)) continue;
  const line = p.textContent.split('\n').slice(1).find(l => /^\s*([-*+]|\d+[.)])\s+\S|^\s*\||^\s*#{1,6}\s/.test(l));
  if (line !== undefined) out.push(`Markdown left as text in a paragraph (list, table or heading): ${short(line)}`);
}
return out;
"""


def page_problems(drv) -> list[str]:
    "What PAGE_CHECKS_JS finds wrong on the page the browser shows."
    return drv.execute_script(PAGE_CHECKS_JS)


def _screenshot(drv, path):
    height = drv.execute_script('return Math.min(document.documentElement.scrollHeight, 4000)')
    drv.set_window_size(1280, max(900, height)); drv.save_screenshot(str(path)); drv.set_window_size(1280, 900)


@pytest.mark.slow
def test_site_in_headless_chromium(built_site, server, browser):
    info = built_site
    assert not info['left_out'], f'pages left out: {info["left_out"]}'
    pages = [p.replace('.md', '.html') for p in info['pages']]
    nb_pages = {bd.page_name(Path(r), bd.front_matter(nbformat.read(ROOT / 'build/docs/proc' / r, as_version=4)))
                for r in info['notebooks']}
    assert {p.replace('.html', '.md') for p in pages} == nb_pages, 'every notebook of nbs/ is a page'
    shots = Path(os.environ.get('DOCS_SCREENSHOTS', ROOT / 'build' / 'docs' / 'screenshots'))
    shots.mkdir(parents=True, exist_ok=True)
    links, named, problems = set(), set(), []  # named: links written in the text (not nbdev's `name` links)
    component = next((p for p in pages if p != 'index.html' and list((SITE / Path(p).parent).glob(
        f'{Path(p).stem}_files/*.png'))), next((p for p in pages if p != 'index.html'), None))
    for page in pages:
        browser.get(server + page)
        title = info['titles'][page.replace('.html', '.md')]
        if title not in browser.title: problems.append(f'{page}: title {browser.title!r}, expected {title!r} in it')
        h1 = [e.text.strip().rstrip('¶').strip() for e in browser.find_elements('css selector', 'article h1')]
        if h1 != [title]: problems.append(f'{page}: h1 headings {h1}, expected [{title!r}]')
        deadline = time.time() + 20
        while time.time() < deadline and not browser.execute_script(
                'return [...document.images].every(i => i.complete)'): time.sleep(0.2)
        for src, width in browser.execute_script(
                'return [...document.images].map(i => [i.currentSrc || i.src, i.naturalWidth])'):
            if not width: problems.append(f'{page}: image did not load: {src}')
        problems += [f'{page}: {p}' for p in page_problems(browser)]
        for href, code in browser.execute_script(
                'return [...document.querySelectorAll("a[href]")].map(a => [a.href, !!a.querySelector("code")])'):
            if href.startswith(server): links.add(href); named |= {href} if not code else set()
        if page == 'index.html': _screenshot(browser, shots / 'home.png')
        if page == component: _screenshot(browser, shots / f'component_{Path(page).stem}.png')
    if 'id="upstream-defects"' not in (SITE / 'index.html').read_text(encoding='utf-8'):
        problems.append('index.html: no "Upstream defects" heading (anchor #upstream-defects) for the defect links')
    missing_anchors = []
    for link in sorted(links):
        url, _, frag = link.partition('#')
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                status, body = r.status, r.read().decode('utf-8', 'replace')
        except urllib.error.HTTPError as e: status, body = e.code, ''
        if status != 200: problems.append(f'link {link}: HTTP {status}'); continue
        if frag and url.endswith('.html') and f'id="{urllib.parse.unquote(frag)}"' not in body:
            (problems.append(f'link {link}: no heading or anchor with that id') if link in named else
             missing_anchors.append(link))
    print(f'\n{len(pages)} pages, {len(links)} internal links; screenshots in {shots}')
    if missing_anchors: print(f'nbdev links to anchors that do not exist (not a failure): {missing_anchors}')
    assert not problems, '\n'.join(problems)
    assert (shots / 'home.png').stat().st_size > 10_000


@pytest.mark.slow
def test_nbdev_can_render_every_notebook(built_site):
    "nbdev's own docs processing (what `nbdev_proc_nbs` / `nbdev_docs` run) works on every notebook as written."
    problems = built_site['nbdev_docs_problems']
    assert not problems, '\n\n'.join(f'nbs/{k}: {v}' for k, v in problems.items())


@pytest.mark.slow
def test_every_exported_name_is_documented(built_site):
    "Each top-level name in _modidx has its show_doc entry on the page and anchor nbdev links to."
    from radiodiff_vae._modidx import d
    missing = []
    for mod, syms in d['syms'].items():
        for name, (doc, _src) in syms.items():
            if name.count('.') != 2 or name.rsplit('.', 1)[1].startswith('_'):
                continue  # methods are documented where the notebook shows them; nbdev skips private names
            page, _, anchor = doc.partition('#')
            html = SITE / page
            if not html.exists() or f'id="{anchor}"' not in html.read_text(encoding='utf-8'):
                missing.append(f'{name} -> {doc}')
    assert not missing, 'not documented in the site:\n' + '\n'.join(missing)
