"""`nbdev_test`, keeping each executed notebook for the docs build.

`python docs/nbdev_test_keep.py [nbdev_test's arguments]` runs nbdev's own `nbdev_test` function: the same command-line
arguments, the same notebooks, the same rules for which cells run (`tst_flags` of settings.ini, `--flags`,
`#| eval: false`, `nbdev_export()` cells, `skip_exec`), the same parallel workers (forked), the same messages and
exit status. One thing is added: each top-level notebook that passes is written, with the outputs nbdev_test's shell
captured (figures included: nbdev's shell draws matplotlib inline), to `build/docs/executed/`, under the key
docs/build_docs.py looks up (the notebook's cells, the skipped test flags and the package's source). The docs build
(`make docs`, `tests/test_docs.py`) then reuses those copies instead of executing every notebook a second time.
A notebook that fails, or one nbdev_test does not run, is not written; the docs build executes it itself.
"""
from __future__ import annotations
import multiprocessing, os, sys
from pathlib import Path

import nbformat
import nbdev.test
from execnb.shell import CaptureShell
from fastcore.script import anno_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_docs as bd  # noqa: E402

RUN_FLAGS: set[str] = set()  # nbdev_test's --flags, set before the workers fork


def plain(o):
    "execnb's outputs (fastcore `AttrDict`s and `L`s) as plain dicts and lists."
    if isinstance(o, dict): return {k: plain(v) for k, v in o.items()}
    if isinstance(o, (str, bytes)) or not hasattr(o, '__iter__'): return o
    return [plain(v) for v in o]


def keep_executed(path: Path, ran, skipped_code: list[bool], run_flags: set[str]) -> Path | None:
    """Write the outputs of `ran` (nbdev_test's executed copy of notebook `path`) onto the notebook as saved, into
    build/docs/executed/, keyed as `build_docs.execute_notebook` keys its own runs; None where the docs build must run it."""
    try: rel = Path(path).resolve().relative_to(bd.NBS)
    except ValueError: return None
    if bd.is_pipeline(rel) or rel.name.startswith(('_', '.')): return None
    nb = nbformat.read(bd.NBS / rel, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    ran_code = [c for c in ran.cells if c.cell_type == 'code']
    if len(code) != len(ran_code) or len(code) != len(skipped_code):
        print(f'warning: nbs/{rel}: executed cells do not line up with the saved notebook; the docs build will run it',
              file=sys.stderr)
        return None
    skip_flags = bd.skipped_flags(run_flags)
    cells, key = bd.cache_key(nb, skip_flags, False, bd.package_digest())
    count = 0
    for cell, done, skipped in zip(code, ran_code, skipped_code):
        if skipped:
            cell.outputs, cell.execution_count = [], None
            if bd.cell_flags(cell) & skip_flags: cell.metadata['docs_skipped'] = True
            continue
        count += 1
        cell.execution_count = count
        cell.outputs = [nbformat.from_dict(plain(o)) for o in (done.get('outputs') or [])]
        for o in cell.outputs:
            if o.output_type == 'execute_result': o.execution_count = count
    nb.metadata['docs_build'] = {'key': key, 'cells': cells, 'executed': True, 'by': 'nbdev_test'}
    dst = bd.EXECUTED / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f'.{dst.name}.{os.getpid()}.tmp')
    nbformat.write(nb, tmp); os.replace(tmp, dst)
    return dst


class KeepingShell(CaptureShell):
    "nbdev_test's shell (execnb's `CaptureShell`) that also keeps the notebook it ran to the end without an error."
    def __init__(self, path=None, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        self.notebook_path = Path(path) if path else None

    def run_all(self, nb, exc_stop=False, preproc=lambda cell: False, *args, **kwargs):
        super().run_all(nb, exc_stop, preproc, *args, **kwargs)   # raises on a failing cell: nothing kept
        if self.exc is None and self.notebook_path is not None:
            keep_executed(self.notebook_path, nb, [bool(preproc(c)) for c in nb.cells if c.cell_type == 'code'], RUN_FLAGS)


def main():
    global RUN_FLAGS
    RUN_FLAGS = set(anno_parser(nbdev.test.nbdev_test.__wrapped__).parse_args().flags.split())
    multiprocessing.set_start_method('fork', force=True)  # the workers inherit the patched shell
    nbdev.test.CaptureShell = KeepingShell
    nbdev.test.nbdev_test()  # parses the same arguments; exits 1 when a notebook fails


if __name__ == '__main__':
    main()
