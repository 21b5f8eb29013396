import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from tests.tiny_models import make_tiny_checkpoint

torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run on the CPU interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def scout_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("scout"), "scout")


@pytest.fixture(scope="session")
def maverick_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("maverick"), "maverick")


@pytest.fixture(scope="session")
def scout_mm_dir(tmp_path_factory):
    """Scout-like text weights inside a Llama4ForConditionalGeneration checkpoint."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("scout_mm"), "scout", multimodal=True)
