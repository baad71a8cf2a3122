"""Golden parity against the original implementation (see tests/fixtures/parity/FORMAT.md).

Every case of every manifest is run by the runner registered for its ``kind``; nothing here knows
individual cases. Extra fixture sets of the same format are picked up from ``$KEYFACE_PARITY_DIR``.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity_kinds import load_all_runners

VISIBLE = Path(__file__).parent / "fixtures" / "parity"


def _manifest_dirs():
    dirs = [VISIBLE]
    extra = os.environ.get("KEYFACE_PARITY_DIR")
    if extra:
        for part in extra.split(os.pathsep):
            if part:
                dirs.append(Path(part))
    return dirs


def _cases():
    for folder in _manifest_dirs():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest.get("format") == 1, f"{folder}: unknown manifest format {manifest.get('format')}"
        for case in manifest["cases"]:
            set_name = manifest.get("set", folder.name)
            yield pytest.param(case, folder, id=f"{set_name}/{case['name']}")


@pytest.mark.parametrize("case,folder", list(_cases()))
def test_parity_case(case, folder):
    runners = load_all_runners()
    kind = case["kind"]
    assert kind in runners, f"no parity runner for kind {kind!r} (known: {sorted(runners)})"
    expected = load_file(str(folder / case["files"]["outputs"]))
    with torch.no_grad():
        actual = runners[kind](case, folder)
    tol = case["tolerance"]
    assert set(expected) <= set(actual), f"runner did not produce {sorted(set(expected) - set(actual))}"
    for name, want in expected.items():
        got = actual[name].detach().to("cpu")
        if got.dtype != want.dtype:
            got = got.to(want.dtype)
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{case['name']}/{name}: {m}")
