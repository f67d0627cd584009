"""The library speaks its own language: no message under pipeline/ or model/ names a command-line
flag (the engine maps their words to flags, engine/wording.py)."""
import ast
import pathlib
import re

import pytest
from conftest import ROOT

from engine.wording import FLAG_WORDS, flag_wording

FLAG = re.compile(r"(?<![\w-])--[a-z]")  # --flag, not a "--" separator or an em dash in words
LIBRARY = ("pipeline", "model")


def string_literals(path: pathlib.Path):
    """(line, text) of every string literal but docstrings (f-strings: their literal parts)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    for node in ast.walk(tree):
        if id(node) in docs or not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        yield node.lineno, node.value  # f-strings: ast.walk reaches their literal parts too


def library_files():
    return sorted(p for pkg in LIBRARY for p in (pathlib.Path(ROOT) / pkg).rglob("*.py"))


def test_the_scan_finds_a_flag(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""--docstrings may name flags."""\ndef f(x):\n    raise ValueError(f"--img-size {x} is wrong")\n')
    assert [text for _, text in string_literals(bad)] == ["--img-size ", " is wrong"]


def test_no_flag_in_a_library_message():
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in library_files()
             for line, text in string_literals(p) if FLAG.search(text)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("library,cli", FLAG_WORDS)
def test_every_mapped_phrase_is_still_said_by_the_library(library, cli):
    sources = "\n".join(p.read_text() for p in library_files())
    assert library in sources, f"engine/wording.py maps {library!r}, which pipeline/ and model/ no longer say"
    assert cli in flag_wording(f"x {library} y")


def test_library_warnings_reach_the_user_in_flag_words(caplog):
    """train_stream rewrites the library's log lines as it rewrites its errors."""
    import logging

    from engine.cli import install_log_wording
    log = logging.getLogger("pipeline")
    before = list(log.filters)
    install_log_wording()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            log.warning("skipped sample %r: too big (over the per-sample byte limit)", "k1")
    finally:
        log.filters[:] = before  # other tests read the library's own words
    assert caplog.records[-1].getMessage() == "skipped sample 'k1': too big (over --max-sample-bytes)"
