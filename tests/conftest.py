import os

# 8 fake CPU devices so every test exercises sharding; must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands run through jaxsr.cli.main in a test process must not fill the user's compilation cache
# (tests/test_compilation_cache.py switches it on for its own subprocesses).
os.environ.setdefault("JAXSR_COMPILATION_CACHE", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES
