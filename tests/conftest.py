import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core runner the thread sync costs
    several times the arithmetic. Modules of tiny-model tests opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
