"""Real text that every fresh machine of this kind has, as named lists of documents (no download).

- Python's standard library: ``code`` (its modules), ``docs`` (every docstring, and ``pydoc``'s topic pages);
- Debian's manual pages: ``man-en``, ``man-fr``, ``man-de`` (roff, stripped to its text);
- Debian's message catalogues (gettext ``.mo`` files of the installed programs): ``po-de``, ``po-fr``,
  ``po-ru``, ``po-es``, ``po-ja``: the user-interface strings of each program in that language.

Each document is ``(name, text)``; the lists are sorted by name, so the corpora are the same on every
machine with the same packages. A corpus that a machine lacks is an error naming what is missing.
"""

from __future__ import annotations

import ast
import gettext
import gzip
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

Document = tuple[str, str]

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAN = Path("/usr/share/man")
LOCALE = Path("/usr/share/locale")

# Characters groff writes as escapes: \(xx and \[xx]
_GLYPHS = {
    ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "'e": "é", "`e": "è", "^e": "ê",
    "'a": "á", "`a": "à", "^a": "â", ",c": "ç", "^o": "ô", "^i": "î", ":e": "ë", ":i": "ï", "'E": "É", "`A": "À",
    "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "em": "—", "en": "–", "bu": "•", "co": "©",
    "hy": "-", "mi": "-", "ti": "~", "ha": "^", "rs": "\\", "lh": "☜", "rh": "☞", "Fo": "«", "Fc": "»", "fo": "‹",
    "fc": "›", "de": "°", "tm": "™", "rg": "®", "aa": "´", "ga": "`", "ul": "_", "pl": "+", "eq": "=", "->": "→",
}  # fmt: skip
_ESCAPE = re.compile(r"\\(?:\((..)|\[([^\]]*)\]|f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\(..|\[[^\]]*\]|.)|[&|^%:]|(.))")


def _unescape(match: re.Match) -> str:
    glyph = match[1] or match[2]
    if glyph is not None:
        return _GLYPHS.get(glyph, "")
    single = match[3]
    return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "\\": "\\"}.get(single, "") if single else ""


def roff_text(source: str) -> str:
    """The running text of a manual page: requests dropped (their arguments kept), escapes resolved."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request, _, arguments = line[1:].partition(" ")
            if request in ("SH", "SS", "TH", "B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "IP", "TP", "Nm", "Nd"):
                line = arguments.replace('"', "")
            else:
                continue
        lines.append(_ESCAPE.sub(_unescape, line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def manual_pages(language: str, every: int = 1) -> list[Document]:
    """The manual pages of one language (``"en"``: the untranslated ones), as text; ``every``: one page in so many."""
    folders = sorted(MAN.glob("man[1-8]")) if language == "en" else sorted((MAN / language).glob("man[1-8]"))
    paths = [path for folder in folders for path in sorted(folder.glob("*.gz"))][::every]
    documents = []
    for path in paths:
        try:
            with gzip.open(path) as file:
                text = roff_text(file.read().decode("utf-8", errors="replace"))
        except (OSError, EOFError):
            continue
        if len(text) > 200:
            documents.append((f"{language}/{path.parent.name}/{path.name}", text))
    return documents


def message_catalogues(language: str) -> list[Document]:
    """Each installed program's translated messages in ``language``, one document per program."""
    documents = []
    for path in sorted((LOCALE / language / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as file:
                catalogue = gettext.GNUTranslations(file)._catalog
        except (OSError, ValueError):  # unreadable or not UTF-8 (UnicodeDecodeError is a ValueError)
            continue
        messages = [text for key, text in catalogue.items() if key and isinstance(text, str) and text.strip()]
        if messages:
            documents.append((f"{language}/{path.stem}", "\n".join(messages)))
    return documents


def _stdlib_modules() -> Iterator[tuple[Path, str]]:
    for path in sorted(STDLIB.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            yield path, path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def stdlib_code() -> list[Document]:
    return [(str(path.relative_to(STDLIB)), text) for path, text in _stdlib_modules() if len(text) > 200]


def stdlib_docs() -> list[Document]:
    """Every docstring of the standard library (one document per module), and pydoc's topic pages."""
    documents = []
    for path, source in _stdlib_modules():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))),
        ]
        texts = [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) > 40]
        if texts:
            documents.append((str(path.relative_to(STDLIB)), "\n\n".join(texts)))
    from pydoc_data.topics import topics

    documents.extend((f"pydoc/{name}", text) for name, text in sorted(topics.items()))
    return documents


CORPORA: dict[str, Callable[[], list[Document]]] = {
    "code": stdlib_code,
    "docs": stdlib_docs,
    "man-en": lambda: manual_pages("en", every=8),  # 94 MB of text in all: an eighth is plenty
    "man-fr": lambda: manual_pages("fr"),
    "man-de": lambda: manual_pages("de"),
    "po-de": lambda: message_catalogues("de"),
    "po-fr": lambda: message_catalogues("fr"),
    "po-ru": lambda: message_catalogues("ru"),
    "po-es": lambda: message_catalogues("es"),
    "po-ja": lambda: message_catalogues("ja"),
}


def load(name: str, minimum_bytes: int = 100_000) -> list[Document]:
    """Corpus ``name``; an error naming what this machine lacks when it has too little of it."""
    documents = CORPORA[name]()
    size = sum(len(text.encode()) for _, text in documents)
    if size < minimum_bytes:
        where = {"man": MAN, "po": LOCALE}.get(name.split("-")[0], STDLIB)
        raise SystemExit(
            f"corpus {name!r}: only {size:,} bytes of text found under {where} (needs {minimum_bytes:,}); "
            "this machine lacks the packages that install it"
        )
    return documents
