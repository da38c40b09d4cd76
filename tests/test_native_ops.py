"""DeepSpeed's CPU op is found in the environment's own folder, never over a user's setting."""

from __future__ import annotations

import os
import sys

from medsight.train import native_ops


def test_the_environment_folder_is_used_when_the_bootstrap_built_one(tmp_path, monkeypatch):
    monkeypatch.delenv(native_ops.ENV, raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    native_ops.use_prebuilt()
    assert native_ops.ENV not in os.environ  # no folder yet: torch's default stays

    (tmp_path / "torch-extensions").mkdir()
    native_ops.use_prebuilt()
    assert os.environ[native_ops.ENV] == str(tmp_path / "torch-extensions")


def test_a_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(native_ops.ENV, "/somewhere/else")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    (tmp_path / "torch-extensions").mkdir()
    native_ops.use_prebuilt()
    assert os.environ[native_ops.ENV] == "/somewhere/else"
