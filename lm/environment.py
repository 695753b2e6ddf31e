"""The software a result came from: Python, the installed versions of lm's main dependencies, lm and its commit.

Recorded with a run so that a number can be traced to the environment that produced it (constraints.txt pins
the versions that README's numbers come from).
"""

import importlib.metadata
import pathlib
import platform
import subprocess

import lm

# Distribution names, as pip knows them; libtpu is there only with `lm[tpu]`.
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "tensorflow-datasets",
  "sentencepiece",
  "numpy",
  "libtpu",
)


def git_commit(directory: str | pathlib.Path) -> str | None:
  """HEAD of the git checkout holding `directory`, or None outside git, without git, or if git is slow."""
  try:
    out = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
    )
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, str]:
  """{"python": ..., package: version for each of PACKAGES installed, "lm": ..., "lm_commit": HEAD if in git}."""
  found = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  found["lm"] = lm.__version__
  commit = git_commit(pathlib.Path(lm.__file__).parent)
  if commit:
    found["lm_commit"] = commit
  return found
