"""Build checks of the documentation (an MkDocs hook, see mkdocs.yml).

Each mismatch is logged as a warning, which fails ``mkdocs build --strict``:

- the parameter tables of docs/options.md and docs/ray.md against the signatures of
  ``FastVectorEnv`` and ``RayVectorEnv``: the same names and the same defaults;
- the ``Args:`` sections of the public constructors' docstrings against their signatures
  (griffe cannot check entries that document two parameters at once, "a / b", so the
  API pages switch its check off for those classes and this one splits the pairs);
- every path named in the first column of docs/architecture.md's table exists.

The sources are read statically with griffe (installed with mkdocstrings-python), so the
compiled modules need not be built.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import griffe

log = logging.getLogger("mkdocs.plugins.fastvec_checks")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# How a table writes a default that the signature spells otherwise.
_DOC_SPELLING = {"1 GiB": "1 << 30", "NEXT_STEP": "AutoresetMode.NEXT_STEP"}

# page -> (object path, signature parameters the table leaves to the text around it)
_TABLES = {
    "options.md": ("fastvec.FastVectorEnv", {"env_fns"}),
    "ray.md": ("fastvec.ray.RayVectorEnv", {"env_fns", "fastvec_kwargs"}),
}
_CONSTRUCTORS = ("fastvec.FastVectorEnv", "fastvec.ray.RayVectorEnv", "fastvec.sb3.SB3VecEnv")


def _warn(msg: str) -> None:
    log.warning("docs check: %s", msg)


def _load(path: str):
    loader = griffe.GriffeLoader(search_paths=[ROOT])
    module, _, rest = path.partition(".")
    obj = loader.load(module)
    loader.resolve_aliases(implicit=False, external=False)
    for part in rest.split("."):
        obj = obj[part]
    return obj.final_target if isinstance(obj, griffe.Alias) else obj


def _signature(cls) -> dict[str, str | None]:
    """Parameter name -> default as written in the source (None: no default)."""
    init = cls.members["__init__"]
    init = init.final_target if isinstance(init, griffe.Alias) else init
    return {p.name: (None if p.default is None else str(p.default))
            for p in init.parameters if p.name != "self"}


def _documented(cls) -> list[str]:
    names: list[str] = []
    if cls.docstring is None:
        return names
    for section in cls.docstring.parse("google", warn_unknown_params=False,
                                       warn_missing_types=False):
        if section.kind is griffe.DocstringSectionKind.parameters:
            for item in section.value:
                names += [n.strip().lstrip("*") for n in item.name.split("/")]
    return names


def _table_rows(markdown: str) -> list[tuple[list[str], list[str]]]:
    """(names, defaults) of each row of the first ``| parameter | default | ...`` table."""
    rows, inside = [], False
    for line in markdown.splitlines():
        if re.match(r"^\|\s*parameter\s*\|\s*default\s*\|", line):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            cells = line.split("|")
            if set(cells[1].strip()) <= {"-", ":"}:
                continue
            rows.append((re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _same_default(doc: str, source: str | None) -> bool:
    doc = _DOC_SPELLING.get(doc, doc)
    return source is not None and doc.replace('"', "'") == source.replace('"', "'")


def _check_table(page: str, markdown: str) -> None:
    path, left_out = _TABLES[page]
    sig = _signature(_load(path))
    rows = _table_rows(markdown)
    if not rows:
        _warn(f"{page}: no '| parameter | default |' table found")
        return
    seen = set()
    for names, defaults in rows:
        if len(names) != len(defaults):
            _warn(f"{page}: row {names} has {len(defaults)} defaults for {len(names)} names")
            continue
        for name, default in zip(names, defaults):
            seen.add(name)
            if name not in sig:
                _warn(f"{page}: `{name}` is not a parameter of {path}")
            elif not _same_default(default, sig[name]):
                _warn(f"{page}: `{name}` defaults to {sig[name]} in {path}, the table says "
                      f"{default}")
    for name in sorted(set(sig) - seen - left_out):
        _warn(f"{page}: {path} takes `{name}`, which the table does not list")


def _check_docstrings() -> None:
    for path in _CONSTRUCTORS:
        cls = _load(path)
        sig, documented = set(_signature(cls)), _documented(cls)
        for name in documented:
            if name not in sig:
                _warn(f"{path}'s docstring documents `{name}`, which it does not take")
        for name in sorted(sig - set(documented)):
            _warn(f"{path}'s docstring does not document its parameter `{name}`")


def _check_paths(markdown: str) -> None:
    inside = False
    for line in markdown.splitlines():
        if re.match(r"^\|\s*path\s*\|", line):
            inside = True
            continue
        if not inside or line.startswith("|---"):
            continue
        if not line.startswith("|"):
            break
        for ref in re.findall(r"`([^`]+)`", line.split("|")[1]):
            m = re.match(r"^(.*)\{(.*)\}(.*)$", ref)
            refs = [m.group(1) + alt + m.group(3) for alt in m.group(2).split(",")] if m else [ref]
            for r in refs:
                if not glob.glob(os.path.join(ROOT, r)):
                    _warn(f"architecture.md names `{r}`, which does not exist")


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    if src in _TABLES:
        _check_table(src, markdown)
    elif src == "architecture.md":
        _check_paths(markdown)
    elif src == "api/fastvec.md":
        _check_docstrings()
    return markdown
