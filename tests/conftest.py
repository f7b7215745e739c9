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


@pytest.fixture(scope="session")
def world_policy():
    """A random 2-layer policy with the world's tokenizer and chat template (the judge tests' model)."""
    import jaxsr
    from jaxsr.world import load_tokenizer

    tok = load_tokenizer()
    cfg = jaxsr.ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    return jaxsr.random_policy(cfg, seed=1, tokenizer=tok)
