"""lm: a JAX/Flax codebase that carries a language-model study from raw text to fitted scaling law."""

import importlib.util
import os
import pkgutil

__version__ = "0.1.0"


def _keep_libtpu_off_non_tpu_machines() -> None:
  """With `lm[tpu]` (libtpu, for `lm plan`) installed on a machine without TPU chips, JAX would
  still start the TPU runtime at its first device query: seconds of start-up, lines of warnings
  and a lock file that serialises concurrent processes. Restrict JAX to the CPU there, unless the
  user chose platforms or a GPU plugin is installed. `lm plan` reaches libtpu's compiler directly.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if any(m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules()):
    return
  from lm.distributed import google_tpu_present  # noqa: PLC0415

  if not google_tpu_present():
    os.environ["JAX_PLATFORMS"] = "cpu"


_keep_libtpu_off_non_tpu_machines()
