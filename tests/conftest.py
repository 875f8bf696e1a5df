import pytest
import torch

# One intra-op thread: tiny test tensors gain nothing from a second one, and on a busy
# 2-core machine a multi-threaded op waits for a descheduled worker (ms instead of us).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
