import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys

import flax
import jax
import jaxlib
import numpy as np
import optax
import pytest
import sentencepiece

import lm
from lm import environment

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_versions_are_the_installed_ones():
  found = environment.versions()
  assert found["python"] == "{}.{}.{}".format(*sys.version_info[:3])
  assert found["jax"] == jax.__version__ and found["flax"] == flax.__version__
  assert found["optax"] == optax.__version__ and found["numpy"] == np.__version__
  assert found["jaxlib"] == jaxlib.__version__ and found["sentencepiece"] == sentencepiece.__version__
  assert found["orbax-checkpoint"] == importlib.metadata.version("orbax-checkpoint")
  assert found["lm"] == lm.__version__ == importlib.metadata.version("lm")
  assert all(isinstance(v, str) and v for v in found.values())


def test_absent_packages_are_left_out(monkeypatch):
  monkeypatch.setattr(environment, "PACKAGES", ("jax", "no-such-distribution-lm-test"))
  found = environment.versions()
  assert "no-such-distribution-lm-test" not in found and found["jax"] == jax.__version__


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_commit_is_the_checkouts_head():
  commit = environment.versions()["lm_commit"]
  assert re.fullmatch(r"[0-9a-f]{40}", commit)
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
  assert commit == head.stdout.strip()


def test_no_commit_outside_git_or_without_git(tmp_path, monkeypatch):
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path counts
  assert environment.git_commit(tmp_path) is None
  monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
  assert environment.git_commit(REPO) is None
  monkeypatch.setattr(lm, "__file__", str(tmp_path / "lm" / "__init__.py"))
  (tmp_path / "lm").mkdir()
  assert "lm_commit" not in environment.versions() and environment.versions()["jax"] == jax.__version__
