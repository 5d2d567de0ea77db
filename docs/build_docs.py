"""Build the documentation site offline from the notebooks, without Quarto.

Steps (each notebook of `nbs/`, sorted by name, skipping names that start with `_` or `.`):

1. execute it top to bottom in a fresh Jupyter kernel (nbclient, working directory `nbs/`), cells flagged
   with a test flag of `settings.ini` (`#| slow`) excepted unless `--flags` names it; executed copies are
   cached in `build/docs/executed/`, keyed on the notebook's cells and the package's source (the README's test
   command, `python docs/nbdev_test_keep.py`, fills that cache from nbdev_test's own run of the notebooks);
   the papermill pipelines (`nbs/pipelines/`) are documented unexecuted (they are jobs, run them with papermill);
2. process it with nbdev's own processors (what `nbdev_proc_nbs` runs: applies the `#|` directives,
   renders `show_doc` for every exported function and class) into `build/docs/proc/`;
3. convert it to Markdown (figures written as PNG files, LaTeX left to the MkDocs hook that turns it into
   MathML, links to nbdev's doc host and to other notebooks made relative) in `build/docs/md/`, written so that
   Python-Markdown reads it as Jupyter does: blank lines added before lists and tables that follow a paragraph line,
   `$ x $` read as maths, `$$` blocks set apart (`Converter.site_markdown`);
4. build the site with MkDocs + Material into `site/` (navigation in notebook order, index.ipynb = home page).

`--readme` instead writes README.md from the processed nbs/index.ipynb (what `nbdev_readme` does with Quarto);
links to other notebooks point into nbs/, `index.ipynb#x` (e.g. `[defect 3](index.ipynb#upstream-defects)`) to `#x`.
Users with Quarto can still run `nbdev_docs`; this script does not touch `nbs/_quarto.yml` or `_proc/`.
"""
from __future__ import annotations
import argparse, base64, configparser, hashlib, json, os, re, shutil, subprocess, sys, time, urllib.parse
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
BUILD = ROOT / 'build' / 'docs'
EXECUTED, PROCESSED, MARKDOWN = BUILD / 'executed', BUILD / 'proc', BUILD / 'md'
DOCS = ROOT / 'docs'
SITE = ROOT / 'site'
CACHE_VERSION = '1'
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
DIRECTIVE = re.compile(r'^\s*#\s*\|\s*(.*?)\s*$')


class DocsBuildError(RuntimeError):
    "A notebook could not be executed, processed or converted."


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


def doc_prefix() -> str:
    "The absolute URL nbdev gives pages (`doc_host` + `doc_baseurl`), which links in the site make relative."
    s = settings()
    return s.get('doc_host', '').rstrip('/') + '/' + s.get('doc_baseurl', '').strip('/') + '/'


# ---------------------------------------------------------------- which notebooks
def find_notebooks() -> list[Path]:
    "Notebooks of the site, relative to nbs/: top-level ones sorted by name, then the pipelines."
    def keep(p): return not p.name.startswith(('_', '.'))
    top = sorted((p for p in NBS.glob('*.ipynb') if keep(p)), key=lambda p: p.name)
    pipes = sorted((p for p in (NBS / 'pipelines').glob('*.ipynb') if keep(p)), key=lambda p: p.name)
    return [p.relative_to(NBS) for p in top + pipes]


def is_pipeline(rel: Path) -> bool: return rel.parts[0] == 'pipelines'


# ---------------------------------------------------------------- 1. execute
def package_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / settings().get('lib_path', 'radiodiff_vae')).rglob('*.py')):
        h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()


def cell_flags(cell) -> set[str]:
    "The bare `#| word` directives at the top of a code cell (nbdev's test flags such as `slow`)."
    flags = set()
    for line in cell.source.splitlines():
        m = DIRECTIVE.match(line)
        if not m:
            if line.strip(): break
            continue
        words = m.group(1).split()
        if len(words) == 1 and ':' not in words[0]: flags.add(words[0])
    return flags


def skipped_flags(run_flags: set[str]) -> set[str]:
    "The test flags of `settings.ini` (`tst_flags`) whose cells are not run: all but `run_flags` (as `nbdev_test --flags`)."
    return set(settings().get('tst_flags', '').split()) - set(run_flags)


def cache_key(nb, skip_flags: set[str], allow_errors: bool, pkg: str) -> tuple[str, str]:
    "`(cells, key)`: digest of the notebook's cells and run options, and that digest combined with the package's (`pkg`)."
    cells = hashlib.sha256(json.dumps([CACHE_VERSION, sorted(skip_flags), allow_errors,
                                       [(c.cell_type, c.source) for c in nb.cells]]).encode()).hexdigest()
    return cells, hashlib.sha256((cells + pkg).encode()).hexdigest()


def execute_notebook(rel: Path, run_flags: set[str], pkg: str, timeout: int, allow_errors: bool) -> tuple[Path, bool, float]:
    "Execute nbs/`rel` into build/docs/executed/`rel` unless an executed copy with the same key exists."
    from nbclient import NotebookClient
    src, dst = NBS / rel, EXECUTED / rel
    nb = nbformat.read(src, as_version=4)
    skip_flags = skipped_flags(run_flags)
    cells, key = cache_key(nb, skip_flags, allow_errors, pkg)
    if dst.exists():
        old = nbformat.read(dst, as_version=4).metadata.get('docs_build', {})
        if old.get('key') == key or (pkg == 'any' and old.get('cells') == cells): return dst, True, 0.0
    if is_pipeline(rel):  # documented as written: a pipeline is a job, its parameters are the interface
        nb.metadata['docs_build'] = {'key': key, 'cells': cells, 'executed': False}
        dst.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, dst)
        return dst, False, 0.0
    skipped = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code' and cell_flags(cell) & skip_flags:
            cell.metadata.setdefault('tags', []).append('skip-execution'); skipped.append(i)
    t0 = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=allow_errors,
                            resources={'metadata': {'path': str(src.parent)}})
    try: client.execute()
    except Exception as e:
        raise DocsBuildError(f'{src.relative_to(ROOT)}: execution failed in a fresh kernel:\n{e}') from None
    for i in skipped:
        tags = nb.cells[i].metadata['tags']; tags.remove('skip-execution')
        if not tags: del nb.cells[i].metadata['tags']
        nb.cells[i].metadata['docs_skipped'] = True
    nb.metadata['docs_build'] = {'key': key, 'cells': cells, 'executed': True, 'seconds': round(time.time() - t0, 1)}
    dst.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, dst)
    return dst, False, time.time() - t0


def execute_all(rels: list[Path], run_flags: set[str], pkg: str, timeout: int, allow_errors: bool, jobs: int = 1):
    "Yield `(rel, execute_notebook(rel, ...))` as each notebook is done, `jobs` kernels at a time (one process each)."
    if jobs <= 1 or len(rels) <= 1:
        for rel in rels: yield rel, execute_notebook(rel, run_flags, pkg, timeout, allow_errors)
        return
    import concurrent.futures, multiprocessing
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('fork')) as pool:
        futures = {pool.submit(execute_notebook, rel, run_flags, pkg, timeout, allow_errors): rel for rel in rels}
        try:
            for f in concurrent.futures.as_completed(futures): yield futures[f], f.result()
        except BaseException:
            for f in futures: f.cancel()
            raise


# ---------------------------------------------------------------- 2. nbdev processing
def mixed_import_cells(path: Path) -> list[int]:
    """Indices of code cells that hold an import and other statements, in a notebook that exports.

    nbdev re-runs every cell containing an import (besides export and show_doc cells) when it renders the API docs,
    so such a cell fails there when it uses a name from a cell nbdev did not run (its FAQ: imports in their own cell).
    """
    import ast
    nb = nbformat.read(path, as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == 'code']
    if not any(split_directives(c.source)[0].keys() & {'export', 'exports', 'exporti'} for _, c in code): return []
    bad = []
    for i, c in code:
        opts, body = split_directives(c.source)
        if opts.keys() & {'export', 'exports', 'exporti', 'exec_doc'} or str(opts.get('eval', '')).lower() == 'false':
            continue
        try: tree = ast.parse('\n'.join(l for l in body if not l.lstrip().startswith(('%', '!'))))
        except SyntaxError: continue
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)) and \
           not all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
            bad.append(i)
    return bad



def nbdev_process(src: Path, dst: Path):
    "Run nbdev's docs processors (those of `nbdev_proc_nbs`) on `src`, writing `dst`."
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    dst.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd(); os.chdir(ROOT)
    try: nbdev.serve_drv.main((src, dst, FilterDefaults))
    except Exception as e:
        hint = ('\n(nbdev runs only export cells, show_doc cells and cells that contain imports when it renders'
                ' the API docs, so a cell that mixes imports with code using earlier private names fails; give the'
                ' imports a cell of their own: the nbdev FAQ. `nbdev_docs` with Quarto fails the same way.)')
        raise DocsBuildError(f'{src.relative_to(ROOT)}: nbdev processing (show_doc) failed: {e}{hint}') from e
    finally: os.chdir(cwd)
    return dst


def title_cell_dropped_lines(path: Path) -> list[str]:
    "Lines of the notebook's `# Title` markdown cell that nbdev drops (it keeps only the title, `> summary`, `- k: v`)."
    for c in nbformat.read(path, as_version=4).cells:
        if c.cell_type == 'markdown' and re.search(r'^#\s+\S', c.source, flags=re.M):
            return [l for l in c.source.splitlines() if l.strip() and not re.match(r'^(#\s|>\s|-\s+\S.*:)', l)]
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'): return []
    return []


def without_rerun(path: Path, cells: list[int]) -> Path:
    "A copy of executed notebook `path` whose `cells` carry `#| eval: false`, so nbdev's show_doc pass skips them."
    nb = nbformat.read(path, as_version=4)
    for i in cells: nb.cells[i].source = '#| eval: false\n' + nb.cells[i].source
    out = BUILD / 'norerun' / path.relative_to(EXECUTED)  # same file name: nbdev derives the page name from it
    out.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, out)
    return out


# ---------------------------------------------------------------- 3. to Markdown
def page_name(rel: Path, front: dict) -> str:
    "Site path of a notebook's page, as nbdev names it (`output-file`, e.g. `core.html`) but with .md."
    if rel.stem == 'index' and not is_pipeline(rel): return 'index.md'
    out = front.get('output-file') or re.sub(r'^\d+[a-z]?_', '', rel.stem) + '.html'
    return str(rel.parent / Path(out).with_suffix('.md')) if rel.parent != Path('.') else str(Path(out).with_suffix('.md'))


def front_matter(nb) -> dict:
    for c in nb.cells:
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            body = c.source.strip().strip('-')
            try: return yaml.safe_load(body) or {}
            except yaml.YAMLError: return {}
    return {}


def split_directives(source: str) -> tuple[dict, list[str]]:
    "Quarto-style `#| key: value` options at the top of a cell, and the source lines after them."
    opts, lines = {}, source.splitlines()
    while lines and (DIRECTIVE.match(lines[0]) or not lines[0].strip()):
        m = DIRECTIVE.match(lines.pop(0))
        if m:
            k, colon, v = m.group(1).partition(':'); opts[k.strip()] = v.strip() if colon else True
    return opts, lines


def fence(text: str, lang: str, cls: str = '') -> str:
    ticks = '```'
    while ticks in text: ticks += '`'
    attrs = f'{{ .{lang} .{cls} }}' if cls else lang
    return f'{ticks} {attrs}\n{text.rstrip()}\n{ticks}\n'


def clean_stream(text: str) -> str:
    "Strip ANSI codes and keep what a terminal shows after carriage returns (progress bars)."
    text = ANSI.sub('', text)
    return '\n'.join(line.rsplit('\r', 1)[-1] for line in text.split('\n'))


class Converter:
    "Turn a processed notebook into a Markdown page of the MkDocs site (or the README)."
    def __init__(self, pages: dict[str, str], readme: bool = False):
        self.pages, self.readme, self.prefix = pages, readme, doc_prefix()
        self.site_files = {str(Path(p).with_suffix('.html')) for p in pages.values()}
        self.base, self.assets = None, set()  # folder relative links start from; repository files the site needs

    @staticmethod
    def display_math(md: str) -> str:
        "`$$..$$` standing alone becomes a block (blank lines around it); inside a paragraph or list, inline display style."
        parts = re.split(r'(^```.*?^```[ \t]*$|`[^`\n]+`)', md, flags=re.M | re.S)  # leave code alone
        def fix(text):
            def one(m):
                start = text.rfind('\n', 0, m.start()) + 1
                end = text.find('\n', m.end()); end = len(text) if end < 0 else end
                if text[start:m.start()] == '' and not text[m.end():end].strip():
                    return f'\n\n$${m.group(1)}$$\n\n'
                return '$\\displaystyle ' + ' '.join(m.group(1).split()) + '$'
            return re.sub(r'(?<!\\)\$\$(.+?)\$\$', one, text, flags=re.S)
        return ''.join(p if i % 2 else fix(p) for i, p in enumerate(parts))

    @staticmethod
    def block_breaks(md: str) -> str:
        """Blank lines where Python-Markdown needs them and Jupyter does not: before a list or table that follows a
        paragraph line; nested list items indented by 1-3 spaces get 4 (Python-Markdown's minimum for nesting)."""
        out, fenced, in_math, in_list = [], False, False, False
        lines = md.split('\n')
        for i, line in enumerate(lines):
            prev = out[-1] if out else ''
            if re.match(r'^\s*(```|~~~)', line): fenced = not fenced
            elif not fenced and not in_math:
                item = re.match(r'^( {0,3})([-*]|\d+[.)])[ \t]+\S', line)
                table = (line.lstrip().startswith('|') and i + 1 < len(lines)
                         and re.match(r'^\s*\|?\s*:?-+:?\s*(\||$)', lines[i + 1] or ''))
                if item and in_list and 0 < len(item.group(1)) < 4: line = '    ' + line.lstrip(' ')
                elif item and prev.strip() and not in_list and item.group(2) in ('-', '*', '1.', '1)'): out.append('')  # as CommonMark
                elif table and prev.strip() and not prev.lstrip().startswith('|'): out.append('')
                if item: in_list = True
                elif in_list and line.strip() and not line.startswith((' ', '\t')) and not prev.strip(): in_list = False
            if not fenced and len(re.findall(r'(?<!\\)\$\$', line)) % 2: in_math = not in_math
            out.append(line)
        return '\n'.join(out)

    @staticmethod
    def inline_math(md: str) -> str:
        "`$ x $` as Jupyter reads it: space just inside the dollars is dropped (pandoc and arithmatex would show TeX)."
        def fix(text):
            def one(m):
                if m.group(1) is not None: return m.group(0)  # $$..$$ left to display_math
                return '$' + m.group(2).strip() + '$' if m.group(2).strip() else m.group(0)
            return re.sub(r'(?<!\\)\$\$(.+?)\$\$|(?<![\\$])\$(?!\$)((?:\\.|[^$\\\n]|\n(?!\s*\n))+?)(?<!\\)\$',
                          one, text, flags=re.S)
        parts = re.split(r'(^[ \t]*```.*?^[ \t]*```[ \t]*$|`[^`\n]+`)', md, flags=re.M | re.S)
        return ''.join(p if i % 2 else fix(p) for i, p in enumerate(parts))

    def site_markdown(self, md: str) -> str:
        "A notebook's Markdown as the site's Markdown dialect (Python-Markdown + arithmatex) reads it like Jupyter."
        return self.block_breaks(self.inline_math(self.display_math(md)))

    def output_markdown(self, md) -> str:
        md = md if isinstance(md, str) else ''.join(md)
        return md if self.readme else self.site_markdown(md)

    def links(self, md: str, depth: int) -> str:
        up = '../' * depth
        if not self.readme: md = md.replace(self.prefix, up)
        def nb_link(m):  # [text](07_model.ipynb#x) -> the notebook's page
            target, frag = m.group(2), m.group(3) or ''
            if self.readme:  # README.md at the root: its own headings by anchor, the other notebooks under nbs/
                if target == 'index.ipynb': return f'{m.group(1)}({frag or "#"})'
                if (NBS / target).exists() and not (ROOT / target).exists(): return f'{m.group(1)}(nbs/{target}{frag})'
                return m.group(0)
            page = self.pages.get(target)
            if page is None: return m.group(0)
            return f'{m.group(1)}({up}{Path(page).with_suffix(".html")}{frag})'
        md = re.sub(r'(\[[^\]]*\])\((?:\./)?([\w/.-]+\.ipynb)(#[^)]*)?\)', nb_link, md)
        if self.readme or self.base is None: return md
        md = re.sub(r'(!?\[[^\]]*\]\()([^)\s]+)', lambda m: m.group(1) + self.repo_link(m.group(2), up), md)
        return re.sub(r'(<img\s[^>]*src=")([^"]+)', lambda m: m.group(1) + self.repo_link(m.group(2), up), md)

    def repo_link(self, target: str, up: str) -> str:
        "A relative link to a file of the repository: images are copied into the site, other files link to git_url."
        if re.match(r'^([a-z][\w+.-]*:|#|/)', target) or target.split('#')[0] in self.site_files: return target
        path, _, frag = target.partition('#')
        f = (self.base / urllib.parse.unquote(path)).resolve()
        if not f.exists() or ROOT not in f.parents: return target
        rel = f.relative_to(ROOT).as_posix()
        if f.suffix.lower() in ('.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'):
            self.assets.add(rel); return up + rel
        s = settings()
        return f"{s['git_url']}/{'tree' if f.is_dir() else 'blob'}/{s.get('branch', 'main')}/{rel}" + (f'#{frag}' if frag else '')

    def showdoc_anchors(self, md: str) -> str:
        "Give show_doc headings the anchor nbdev's links use (`#name.attr`, lower case)."
        return re.sub(r'^(#{2,4}) ([\w.]+)\s*$', lambda m: f'{m.group(1)} {m.group(2)} {{ #{m.group(2).lower()} }}',
                      md, flags=re.M)

    def convert(self, nb, page: str) -> tuple[str, dict[str, bytes]]:
        depth = page.count('/')
        stem = Path(page).stem
        out, files, fm = [], {}, front_matter(nb)
        if fm.get('title'):
            out.append(f'# {fm["title"]}\n')
            if self.readme: out.append('<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! -->\n')
            if fm.get('description'): out.append(f'> {fm["description"]}\n')
        for ci, cell in enumerate(nb.cells):
            if cell.cell_type == 'raw': continue
            if cell.cell_type == 'markdown':
                if cell.source.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
                src = cell.source if self.readme else self.site_markdown(cell.source)
                out.append(self.links(src, depth) + '\n'); continue
            opts, body = split_directives(cell.source)
            if str(opts.get('include', '')).lower() == 'false': continue
            if str(opts.get('echo', '')).lower() != 'false' and body:
                out.append(fence('\n'.join(body), 'python'))
            if cell.metadata.get('docs_skipped'):
                out.append('*(slow cell: not run in the docs build; run it in Jupyter)*\n')
            if str(opts.get('output', '')).lower() == 'false': continue
            asis = str(opts.get('output', '')).lower() == 'asis'
            out.extend(self.outputs(cell, ci, asis, stem, depth, files))
        md = '\n'.join(out)
        return (md if self.readme else self.showdoc_anchors(md)), files

    def outputs(self, cell, ci, asis, stem, depth, files):
        res, streams = [], []
        def flush():
            if streams:
                text = clean_stream(''.join(streams)).strip('\n')
                if text.strip(): res.append(fence(text, 'text', 'nb-output'))
                streams.clear()
        for oi, o in enumerate(cell.get('outputs', [])):
            if o.output_type == 'stream': streams.append(o.text); continue
            flush()
            if o.output_type == 'error':
                res.append(fence(ANSI.sub('', '\n'.join(o.traceback)), 'text', 'nb-error')); continue
            data = o.get('data', {})
            if asis and 'text/markdown' in data:
                res.append(self.links(self.output_markdown(data['text/markdown']), depth) + '\n')
            elif any(k in data for k in ('image/png', 'image/jpeg', 'image/svg+xml')):
                kind = next(k for k in ('image/png', 'image/jpeg', 'image/svg+xml') if k in data)
                ext = {'image/png': 'png', 'image/jpeg': 'jpg', 'image/svg+xml': 'svg'}[kind]
                name = f'{stem}_files/cell{ci}_out{oi}.{ext}'
                raw = data[kind]
                files[name] = raw.encode() if ext == 'svg' else base64.b64decode(raw)
                alt = ANSI.sub('', data.get('text/plain', 'figure')).replace('[', '').replace(']', '').replace('\n', ' ')
                width = (o.get('metadata') or {}).get(kind, {}).get('width')  # a 'retina' PNG: twice its display size
                size = f' width="{int(width)}"' if isinstance(width, (int, float)) else ''
                res.append(f'![{alt[:80]}]({name}){{ .nb-figure{size} }}\n' if not self.readme else f'![{alt[:80]}]({name})\n')
            elif 'text/html' in data:
                html = data['text/html'] if isinstance(data['text/html'], str) else ''.join(data['text/html'])
                res.append(f'<div class="nb-output nb-html" markdown="0">\n{html.strip()}\n</div>\n')
            elif 'text/markdown' in data:
                res.append(self.links(self.output_markdown(data['text/markdown']), depth) + '\n')
            elif 'text/latex' in data:
                res.append(data['text/latex'] + '\n')
            elif 'text/plain' in data:
                res.append(fence(ANSI.sub('', data['text/plain']), 'text', 'nb-output'))
        flush()
        return res


# ---------------------------------------------------------------- 4. MkDocs
def nav_title(rel: Path, fm: dict) -> str:
    title = fm.get('title') or rel.stem
    m = re.match(r'^(\d+[a-z]?)_', rel.stem)
    return f'{m.group(1)} {title}' if m else title


def write_mkdocs_yml(nav: list) -> Path:
    cfg = yaml.safe_load((DOCS / 'mkdocs.yml').read_text())
    s = settings()
    cfg.update(docs_dir=str(MARKDOWN), site_dir=str(SITE), nav=nav,
               site_name=cfg.get('site_name') or s.get('title', s['lib_name']),
               site_description=s.get('description', ''),
               hooks=[str(DOCS / h) for h in cfg.get('hooks', [])])
    path = BUILD / 'mkdocs.yml'
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def build_site(run_flags: set[str], timeout: int, allow_errors: bool, strict: bool, reuse_executed=False, jobs: int = 1) -> dict:
    t_start = time.time()
    os.environ['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'  # kernels inherit: figures inline
    if MARKDOWN.exists(): shutil.rmtree(MARKDOWN)
    MARKDOWN.mkdir(parents=True)
    pkg, rels = ('any' if reuse_executed else package_digest()), find_notebooks()
    if not any(r.name == 'index.ipynb' for r in rels):
        raise DocsBuildError('nbs/index.ipynb is missing: it is the home page of the site')
    for rel in rels:
        if not is_pipeline(rel) and (bad := mixed_import_cells(NBS / rel)):
            print(f'warning: nbs/{rel} cells {bad} mix imports with other code: nbdev re-runs them alone when it'
                  ' renders the API docs (fails if they use names from other cells); give imports their own cell',
                  file=sys.stderr, flush=True)
        if dropped := title_cell_dropped_lines(NBS / rel):
            print(f'warning: nbs/{rel}: nbdev keeps only the title and `> summary` of the `# Title` cell and drops its'
                  f' other {len(dropped)} lines (from {dropped[0][:60]!r}): move them to a cell of their own',
                  file=sys.stderr, flush=True)
    timings, executed, procs, failed = {}, {}, {}, {}
    for rel, (exe, cached, secs) in execute_all(rels, run_flags, pkg, timeout, allow_errors, jobs):
        print(f'{"cached  " if cached else "executed"} {rel} ({secs:.1f} s)', flush=True)
        timings[str(rel)] = round(secs, 1); executed[rel] = exe
    executed = {rel: executed[rel] for rel in rels}   # notebook order (the navigation's)
    nbdev_problems = {}
    deps = max(p.stat().st_mtime for p in [ROOT / 'settings.ini', *(ROOT / settings()['lib_path']).rglob('*.py')])
    for rel, exe in executed.items():
        dst, note = PROCESSED / rel, (PROCESSED / rel).with_suffix('.nbdev_problem.txt')
        if dst.exists() and dst.stat().st_mtime > max(exe.stat().st_mtime, deps):  # processed since: reuse
            procs[rel] = dst
            if note.exists(): nbdev_problems[str(rel)] = note.read_text()
            continue
        note.unlink(missing_ok=True)
        try:
            try: procs[rel] = nbdev_process(exe, PROCESSED / rel)
            except DocsBuildError as e:
                if not (bad := mixed_import_cells(exe)): raise
                # what nbdev_docs would hit: recorded (the browser test fails on it), then the site is built with
                # those cells marked `eval: false` for nbdev (their outputs come from the real run above)
                nbdev_problems[str(rel)] = f'{e}\ncells (0-based) mixing imports with code: {bad}'
                note.parent.mkdir(parents=True, exist_ok=True); note.write_text(nbdev_problems[str(rel)])
                print(f'warning: nbdev_docs would fail on nbs/{rel}: retrying with cells {bad} not re-run',
                      file=sys.stderr, flush=True)
                procs[rel] = nbdev_process(without_rerun(exe, bad), PROCESSED / rel)
        except DocsBuildError as e:
            if not allow_errors: raise
            failed[str(rel)] = str(e); print(f'warning: page left out: {e}', file=sys.stderr)
    pages, fms = {}, {}
    for rel, p in procs.items():
        nb = nbformat.read(p, as_version=4)
        fms[rel] = front_matter(nb); pages[str(rel)] = page_name(rel, fms[rel])
        pages.setdefault(rel.name, pages[str(rel)])
    conv = Converter(pages)
    nav_top, nav_pipes, titles = [], [], {}
    for rel, p in procs.items():
        nb = nbformat.read(p, as_version=4)
        skipped = {tuple(split_directives(c.source)[1]) for c in nbformat.read(EXECUTED / rel, as_version=4).cells
                   if c.metadata.get('docs_skipped')}
        for c in nb.cells:
            if c.cell_type == 'code' and tuple(split_directives(c.source)[1]) in skipped: c.metadata['docs_skipped'] = True
        page = pages[str(rel)]
        # relative links in index.ipynb are written for README.md at the root; elsewhere they start in the notebook's folder
        conv.base = ROOT if page == 'index.md' else (NBS / rel).parent
        md, files = conv.convert(nb, page)  # nbdev drops our cell metadata: skipped cells re-found by source
        (MARKDOWN / page).parent.mkdir(parents=True, exist_ok=True)
        (MARKDOWN / page).write_text(md, encoding='utf-8')
        for name, data in files.items():
            f = (MARKDOWN / page).parent / name; f.parent.mkdir(parents=True, exist_ok=True); f.write_bytes(data)
        titles[page] = fms[rel].get('title') or rel.stem
        entry = {('Home' if page == 'index.md' else nav_title(rel, fms[rel])): page}
        (nav_pipes if is_pipeline(rel) else nav_top).append(entry)
    for asset in sorted(conv.assets):
        (MARKDOWN / asset).parent.mkdir(parents=True, exist_ok=True); shutil.copy(ROOT / asset, MARKDOWN / asset)
    for extra in ('extra.css',):
        shutil.copy(DOCS / extra, MARKDOWN / extra)
    nav = sorted(nav_top, key=lambda e: next(iter(e.values())) != 'index.md')
    if nav_pipes: nav.append({'Pipelines': nav_pipes})
    yml = write_mkdocs_yml(nav)
    cmd = [sys.executable, '-m', 'mkdocs', 'build', '--clean', '-f', str(yml)] + (['--strict'] if strict else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode: raise DocsBuildError(f'mkdocs build failed:\n{r.stdout}\n{r.stderr}')
    total = time.time() - t_start
    info = {'pages': [next(iter(e.values())) for e in nav_top] + [next(iter(e.values())) for e in nav_pipes],
            'titles': titles, 'timings': timings, 'left_out': failed, 'nbdev_docs_problems': nbdev_problems, 'allow_errors': allow_errors,
            'notebooks': [str(r) for r in rels], 'seconds': round(total, 1), 'site': str(SITE)}
    (BUILD / 'build_info.json').write_text(json.dumps(info, indent=1))
    print(f'site built in {total:.1f} s: {SITE}/index.html ({len(info["pages"])} pages)')
    return info


def build_readme(out: Path = ROOT / 'README.md') -> str:
    "README.md = nbs/index.ipynb after nbdev's processing, as Markdown (no execution: its outputs as committed)."
    src = NBS / 'index.ipynb'
    if not src.exists(): raise DocsBuildError('nbs/index.ipynb is missing: README.md is generated from it')
    proc = nbdev_process(src, BUILD / 'readme' / 'index.ipynb')
    md, files = Converter({}, readme=True).convert(nbformat.read(proc, as_version=4), 'README.md')
    if files: raise DocsBuildError('nbs/index.ipynb has figure outputs; README.md cannot hold them: clear them')
    md = re.sub(r'\n{3,}', '\n\n', md).strip() + '\n'
    if out is not None: out.write_text(md, encoding='utf-8')
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--readme', action='store_true', help='write README.md from nbs/index.ipynb and stop')
    ap.add_argument('--flags', default='', help='test flags whose cells run too (e.g. "slow"); default none')
    ap.add_argument('--timeout', type=int, default=900, help='seconds one cell may run (default 900)')
    ap.add_argument('--allow-errors', action='store_true', help='keep building when a notebook cell fails')
    ap.add_argument('--reuse-executed', action='store_true',
                    help='reuse executed notebooks whose cells are unchanged even if the package changed (drafts)')
    ap.add_argument('--strict', action='store_true', help='pass --strict to mkdocs (warnings are errors)')
    ap.add_argument('--jobs', type=int, default=min(4, os.cpu_count() or 1),
                    help='notebooks executed at once, each in its own kernel (default: the logical CPUs, at most 4)')
    a = ap.parse_args(argv)
    try:
        if a.readme: build_readme(); print('wrote README.md from nbs/index.ipynb'); return 0
        build_site(set(a.flags.split()), a.timeout, a.allow_errors, a.strict, a.reuse_executed, a.jobs); return 0
    except DocsBuildError as e:
        print(f'error: {e}', file=sys.stderr); return 2


if __name__ == '__main__':
    sys.exit(main())
