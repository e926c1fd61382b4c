"""Shared test set-up: several forced CPU devices (set before JAX starts) and float32 everywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs a program's collectives on its intra-op thread pool, one thread per core by default. With
# more forced devices than cores, the devices' independent collectives can hold every thread while the
# participants they wait for sit in the pool's queue: the process aborts after 40 s ("Termination
# timeout for `all gather ...`: Expected 4 threads to join the rendezvous, but only 2 of them arrived").
# 4 devices x 4 collectives in flight; the scripts run by the tests inherit it.
os.environ.setdefault("PJRT_NPROC", "16")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
