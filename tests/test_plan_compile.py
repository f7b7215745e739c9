"""`jaxsr plan --compile`: ahead-of-time compiles of an iteration's programs for TPU topologies (needs libtpu:
pip install jaxsr[tpu]); the tests that compile are skipped without it."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_tpu_extra_pins_the_constrained_jax():
    # libtpu must match jaxlib; jax[tpu]==<version> pins the matching libtpu, so the extra follows constraints.txt.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = re.search(r"^jax==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert extras["tpu"] == [f"jax[tpu]=={pinned}"]
