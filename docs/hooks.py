"""MkDocs hook: turn the TeX that pymdownx.arithmatex (generic mode) leaves in pages into MathML.

Browsers render MathML natively, so the site needs no MathJax or KaTeX download and works offline.
TeX that latex2mathml cannot convert stays visible as code, with a warning in the build log.
"""
import html, logging, re

try:
    from latex2mathml.converter import convert
except ImportError as e:  # a dev requirement (settings.ini): say which, rather than a bare traceback
    raise ImportError('the docs site needs latex2mathml: pip install -e ".[dev]" (or pip install latex2mathml)') from e

log = logging.getLogger('mkdocs.hooks.mathml')
INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _mathml(tex: str, display: str, page) -> str:
    tex = html.unescape(tex).strip()
    try:
        return convert(tex, display=display)
    except Exception as e:  # latex2mathml raises many types; the page still shows the TeX
        log.warning('%s: cannot convert TeX to MathML (%s): %s', page.file.src_path, e, tex[:80])
        code = f'<code class="tex">{html.escape(tex)}</code>'
        return f'<div class="tex-block">{code}</div>' if display == 'block' else code


def on_page_content(content, page, config, files):
    content = BLOCK.sub(lambda m: f'<div class="math-block">{_mathml(m.group(1), "block", page)}</div>', content)
    return INLINE.sub(lambda m: _mathml(m.group(1), 'inline', page), content)
