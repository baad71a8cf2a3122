"""One definition per fact (docs/ARCHITECTURE.md): the frame rate 25 is ``keyface.planner.FPS``.

``nodes/`` reads it from the library (``nodes/_common.FPS``); ``js/`` gets it from the server (the
``keyface_fps`` option of KeyFace Emotion's ``curve`` input). So a number 25 in the code of ``nodes/``
or ``js/`` (comments and text excluded) is a copy of the fact creeping back, and fails here. A 25 that
means something else gets a name and an entry in ``NOT_THE_FRAME_RATE``. The nodes' descriptions and
tooltips that state the rate format ``FPS`` too (checked with the library's value changed).
"""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAME_RATE = 25
# (file relative to the root, the stripped code line) of a 25 that is not the frame rate
NOT_THE_FRAME_RATE: set[tuple[str, str]] = set()
JS_NUMBER = re.compile(r"(?<![\w.$])(\d+(?:\.\d*)?|\.\d+)(?![\w.$])")


def python_numbers(text: str):
    """(line number, value) of every number literal in Python code."""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NUMBER:
            yield tok.start[0], ast.literal_eval(tok.string)


def js_code_only(text: str) -> str:
    """The JavaScript source with comments and the text of string literals blanked (line breaks kept);
    the code inside a template literal's ${...} is kept. Our files use no regex literals."""
    out, i, n = [], 0, len(text)
    stack = []  # open template literals: the brace depth of the ${...} they are in

    def blank(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c, two = text[i], text[i:i + 2]
        if stack and stack[-1] is None:  # inside a template literal's text
            if c == "\\":
                out.append(blank(text[i:i + 2]))
                i += 2
            elif c == "`":
                stack.pop()
                out.append(" ")
                i += 1
            elif two == "${":
                stack[-1] = 0
                out.append("  ")
                i += 2
            else:
                out.append(blank(c))
                i += 1
            continue
        if two == "//":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif two == "/*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(blank(text[i:j]))
            i = j
        elif c in "'\"":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1]))
            i = j + 1
        elif c == "`":
            stack.append(None)
            out.append(" ")
            i += 1
        else:
            if stack and c == "{":
                stack[-1] += 1
            elif stack and c == "}":
                if stack[-1] == 0:
                    stack[-1] = None  # back in the template's text
                    out.append(" ")
                    i += 1
                    continue
                stack[-1] -= 1
            out.append(c)
            i += 1
    return "".join(out)


def js_numbers(text: str):
    for lineno, line in enumerate(js_code_only(text).splitlines(), start=1):
        for m in JS_NUMBER.finditer(line):
            yield lineno, float(m.group(1))


def frame_rate_copies(root: Path):
    found = []
    files = [(p, python_numbers) for p in sorted((root / "nodes").rglob("*.py"))]
    files += [(p, js_numbers) for p in sorted((root / "js").rglob("*.js"))]
    for path, numbers in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = path.relative_to(root).as_posix()
        for lineno, value in numbers(text):
            code = lines[lineno - 1].strip()
            if value == FRAME_RATE and (rel, code) not in NOT_THE_FRAME_RATE:
                found.append(f"{rel}:{lineno}: {code}")
    return found


def test_frame_rate_is_defined_once():
    from keyface import planner

    assert planner.FPS == FRAME_RATE  # what this test looks for is the library's value
    copies = frame_rate_copies(ROOT)
    assert not copies, ("a literal 25 (the frame rate, keyface.planner.FPS) in nodes/ or js/: read it from "
                        "keyface.planner / nodes/_common.FPS (Python) or from the served 'keyface_fps' option "
                        "(js/emotion_editor.js); if it is not the frame rate, name it and list it in "
                        "NOT_THE_FRAME_RATE:\n" + "\n".join(copies))


@pytest.mark.parametrize("name, source, copies", [
    ("nodes/a.py", "PREVIEW_FPS = 25\n", 1),
    ("nodes/a.py", "x = 25.0  # 25 fps\n", 1),
    ("nodes/a.py", "x = 0.25 + 125  # 25\ntip = 'at 25 fps'\n", 0),
    ("js/a.js", "export function f(c, frames, fps = 25) {}\n", 1),
    ("js/a.js", "const FPS = 25.0;\nconst s = `${t * 25} s`;\n", 2),
    ("js/a.js", "const a = [0.25, 125, 25e3]; // 25 fps\n/* 25 */ const s = \"25\" + '25' + `25 ${x}`;\n", 0),
])
def test_the_check_sees_a_copy(tmp_path, name, source, copies):
    """Not vacuous: a 25 in code is found (Python and JS, template-literal code too); comments, text
    and other numbers are not."""
    (tmp_path / "nodes").mkdir()
    (tmp_path / "js").mkdir()
    (tmp_path / name).write_text(source)
    assert len(frame_rate_copies(tmp_path)) == copies, frame_rate_copies(tmp_path)


NODE_TEXTS_WITH_FPS_30 = r'''
import importlib, importlib.util, json, sys
sys.path.insert(0, sys.argv[2])
import comfy_stubs
comfy_stubs.install()
root, name = sys.argv[1], "keyface_pack_fps_check"
spec = importlib.util.spec_from_file_location(name, root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack  # the package exists, its __init__ (which imports the nodes) has not run yet
importlib.import_module(name + ".keyface.planner").FPS = 30
spec.loader.exec_module(pack)
texts = []
for cls in pack.NODE_CLASS_MAPPINGS.values():
    texts += [getattr(cls, "DESCRIPTION", "")] + list(getattr(cls, "OUTPUT_TOOLTIPS", ()))
    for group in cls.INPUT_TYPES().values():
        for input_spec in group.values():  # ("TYPE",) or ("TYPE", {options})
            if len(input_spec) > 1 and isinstance(input_spec[1], dict):
                texts.append(input_spec[1].get("tooltip", ""))
print(json.dumps(texts))
'''


def test_node_texts_quote_the_library_frame_rate():
    """Descriptions and tooltips that state the frame rate format ``keyface.planner.FPS``: with the
    library's FPS set to 30 before the pack is imported, they say 30 and no text says 25."""
    out = subprocess.run([sys.executable, "-c", NODE_TEXTS_WITH_FPS_30, str(ROOT), str(ROOT / "scripts")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    texts = json.loads(out.stdout)
    says_25 = [t for t in texts if re.search(r"(?<![\d.])25(?![\d.])", t)]
    assert not says_25, "node texts that write the frame rate as a literal 25:\n" + "\n".join(says_25)
    assert sum(bool(re.search(r"(?<![\d.])30(?![\d.])", t)) for t in texts) >= 5, "texts stopped quoting the fps"
