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


@pytest.fixture(scope="session")
def patch_codec():
    """A small linear demo codec fitted on a few world clips (shared by the demo model and trainer tests)."""
    from moga.demo.codec import PatchCodec
    from moga.demo.training import codec_batch, measure_latent_stats

    codec = PatchCodec(16).fit([codec_batch(i, 6, 0, "cpu") for i in range(2)])
    measure_latent_stats(codec, batches=1, batch=6)
    return codec
