"""CI must not pass by skipping the browser tests (runs without a browser)."""

import pytest

from browser_page import unavailable


@pytest.mark.parametrize("env, outcome", [
    ({}, pytest.skip.Exception),
    ({"KEYFACE_REQUIRE_BROWSER": "1"}, pytest.fail.Exception),
    ({"CI": "true"}, pytest.fail.Exception),
], ids=["developer", "required", "ci"])
def test_missing_browser_is_a_failure_where_required(monkeypatch, env, outcome):
    for k in ("KEYFACE_REQUIRE_BROWSER", "CI"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(outcome, match="no chromium"):
        unavailable("no chromium")
