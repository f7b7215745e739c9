"""The persistent compilation cache the CLI sets at start: a second process loads what the first compiled."""

import os
import subprocess
import sys
from pathlib import Path

from jaxsr import cli

ROOT = Path(__file__).resolve().parents[1]
# What the CLI does at start, then one jitted program.
PROGRAM = ("from jaxsr.cli import enable_compilation_cache; print(enable_compilation_cache()); import jax, jax.numpy as jnp; "
           "print(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.arange(5.0)).sum())")


def run(env):
    return subprocess.run([sys.executable, "-c", PROGRAM], env={**os.environ, "PYTHONPATH": str(ROOT), "JAXSR_COMPILATION_CACHE": "1", **env},
                          capture_output=True, text=True, timeout=120, check=True)


def test_a_second_process_reuses_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first = run({"JAXSR_CACHE_DIR": str(cache), "JAX_LOG_COMPILES": "1"})
    assert first.stdout.splitlines()[0] == str(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and "Persistent compilation cache hit" not in first.stderr
    second = run({"JAXSR_CACHE_DIR": str(cache), "JAX_LOG_COMPILES": "1"})
    assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled again
    assert second.stdout == first.stdout


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXSR_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAXSR_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_dir() == tmp_path / "jaxsr" / "xla"
    monkeypatch.setenv("JAXSR_CACHE_DIR", "/somewhere/else")
    assert cli.compilation_cache_dir() == Path("/somewhere/else")
    monkeypatch.setenv("JAXSR_COMPILATION_CACHE", "0")
    assert cli.compilation_cache_dir() is None and cli.enable_compilation_cache() is None


def test_every_command_starts_with_the_cache(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: calls.append(1))
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2  # fails after the start
    assert calls == [1]
