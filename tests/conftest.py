"""Shared fixtures: tiny checkpoints built once per test session (per xdist worker)."""

import os

import pytest
import torch

from tests.helpers import ServerProcess

# CI has 2 cores and pytest-xdist runs 2 workers: one thread each.
torch.set_num_threads(1)
# ... and one for each server, engine and interpreter process they start: two-thread OpenMP pools in
# several processes on 2 cores spin against each other (a 300-token request beside another server
# test took over 30 s instead of ~2 s)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **overrides) -> folder of a tiny random HF checkpoint, cached per arguments."""
    from moeserve.models.tiny import make_tiny

    cache: dict[tuple, str] = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in key[1])
            cache[key] = make_tiny(arch, str(tmp_path_factory.mktemp(name)), **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def deepseek_v3_dir(tiny_model):
    return tiny_model("deepseek_v3")


@pytest.fixture(scope="session")
def deepseek_v2_dir(tiny_model):
    return tiny_model("deepseek_v2")


@pytest.fixture(scope="session")
def qwen3_moe_dir(tiny_model):
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="session")
def server(deepseek_v3_dir):
    srv = ServerProcess(deepseek_v3_dir)
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.output()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def model_name(deepseek_v3_dir):
    return deepseek_v3_dir
