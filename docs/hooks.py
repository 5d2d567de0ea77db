"""MkDocs hook: turn the TeX that pymdownx.arithmatex (generic mode) leaves in pages into MathML.

Browsers render MathML natively, so the site needs no MathJax or KaTeX download and works offline.
TeX that latex2mathml cannot convert stays visible as code, with a warning in the build log.
Three things latex2mathml gets wrong are mended here: escaped characters inside `\\text{..}` (`nll\\_loss` would
show its backslash), delimiters after a size command (`\\big\\lVert` would show as the word), and headings with maths,
whose table-of-contents entry would show the TeX. A display formula made of several equations side by side
(separated by `\\qquad`) becomes one MathML formula per equation in a wrapping row, so it never runs past the column.
"""
import html, logging, re

try:
    from latex2mathml.converter import convert
except ImportError as e:  # a dev requirement (settings.ini): say which, rather than a bare traceback
    raise ImportError('the docs site needs latex2mathml: pip install -e ".[dev]" (or pip install latex2mathml)') from e

log = logging.getLogger('mkdocs.hooks.mathml')
INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
TOC_INLINE = re.compile(r'\\\((.*?)\\\)', re.S)  # what arithmatex's markup becomes in a toc title (tags stripped)
TEXT_GROUP = re.compile(r'(\\(?:text|textrm|texttt|textit|textbf|textsf|mathrm|mathtt|mathit|mathbf|mathsf|operatorname)'
                        r'\s*\{)((?:[^{}]|\{[^{}]*\})*)\}')
# latex2mathml leaves these names as the text of an <mo> when a size command (\big, \Big, ..) precedes them
DELIMITERS = {'lVert': '‖', 'rVert': '‖', 'Vert': '‖', '|': '‖', 'lvert': '|', 'rvert': '|', 'vert': '|',
              'langle': '⟨', 'rangle': '⟩', 'lfloor': '⌊', 'rfloor': '⌋', 'lceil': '⌈', 'rceil': '⌉',
              '{': '{', '}': '}'}
MO_NAME = re.compile(r'(<mo\b[^>]*>)\\(' + '|'.join(re.escape(k) for k in DELIMITERS) + r')(</mo>)')
LEFTOVER = re.compile(r'>[^<]*\\[A-Za-z_%&#$][^<]*<')  # a TeX command latex2mathml copied into the MathML as text


def tex_fixes(tex: str) -> str:
    r"In text groups, `\_` `\%` `\&` `\#` are the characters themselves (latex2mathml would keep the backslash)."
    return TEXT_GROUP.sub(lambda m: m.group(1) + re.sub(r'\\([_%&#])', r'\1', m.group(2)) + '}', tex)


def split_equations(tex: str) -> list[str]:
    r"The equations of a display formula separated by `\qquad` at the top level (not inside braces or environments)."
    if '\\begin' in tex or '\\\\' in tex: return [tex]
    parts, depth, start = [], 0, 0
    for m in re.finditer(r'\\qquad(?![A-Za-z])|\\[{}]|[{}]|\\left(?![A-Za-z])|\\right(?![A-Za-z])', tex):
        tok = m.group(0)
        if tok in ('{', '\\left'): depth += 1
        elif tok in ('}', '\\right'): depth -= 1
        elif tok == '\\qquad' and depth == 0:
            parts.append(tex[start:m.start()]); start = m.end()
    parts.append(tex[start:])
    parts = [p.strip() for p in parts if p.strip()]
    return parts or [tex]


def _mathml(tex: str, display: str, page) -> str:
    tex = tex_fixes(html.unescape(tex).strip())
    try:
        out = MO_NAME.sub(lambda m: m.group(1) + html.escape(DELIMITERS[m.group(2)]) + m.group(3),
                          convert(tex, display=display))
    except Exception as e:  # latex2mathml raises many types; the page still shows the TeX
        log.warning('%s: cannot convert TeX to MathML (%s): %s', page.file.src_path, e, tex[:80])
        code = f'<code class="tex">{html.escape(tex)}</code>'
        return f'<div class="tex-block">{code}</div>' if display == 'block' else code
    if LEFTOVER.search(out):
        log.warning('%s: latex2mathml left a TeX command as text: %s', page.file.src_path, tex[:80])
    return out


def _block(tex: str, page) -> str:
    eqs = split_equations(html.unescape(tex))
    if len(eqs) == 1: return f'<div class="math-block">{_mathml(eqs[0], "block", page)}</div>'
    return '<div class="math-block math-row">' + ''.join(_mathml(e, 'block', page) for e in eqs) + '</div>'


def _toc_titles(items, page):
    for item in items:
        item.title = TOC_INLINE.sub(lambda m: _mathml(m.group(1), 'inline', page), item.title)
        _toc_titles(item.children, page)


def on_page_content(content, page, config, files):
    _toc_titles(page.toc, page)
    content = BLOCK.sub(lambda m: _block(m.group(1), page), content)
    return INLINE.sub(lambda m: _mathml(m.group(1), 'inline', page), content)
