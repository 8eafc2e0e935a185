import os

import pytest

from pipelines.env import scoped_env


def test_scoped_env_sets_unsets_and_restores(monkeypatch):
    monkeypatch.setenv("TPR_T_KEEP", "before")
    monkeypatch.delenv("TPR_T_NEW", raising=False)
    with pytest.raises(RuntimeError), scoped_env(TPR_T_KEEP=None, TPR_T_NEW="x"):
        assert "TPR_T_KEEP" not in os.environ and os.environ["TPR_T_NEW"] == "x"
        raise RuntimeError("restored even on error")
    assert os.environ["TPR_T_KEEP"] == "before" and "TPR_T_NEW" not in os.environ
    with scoped_env(TPR_T_KEEP="inner"):
        assert os.environ["TPR_T_KEEP"] == "inner"
    assert os.environ["TPR_T_KEEP"] == "before"
