"""Say which transformers line the integration tests ran against (CI runs two), and run each test on
one intra-op thread."""
import pytest
import torch


def pytest_report_header(config):
    try:
        import transformers
    except ImportError:
        return "transformers: not installed (integration tests skipped)"
    return f"transformers: {transformers.__version__} ({transformers.__file__})"


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tiny models' matmuls are a few hundred flops: on CPU, waking a second thread for each of
    them costs more than it saves (a tiny LLaVA's tests ran 2.2x faster on one thread, 2-core
    machine). The CPU backend's threading is the op tests' to check (tests/, with every thread);
    here each test runs on one, and the thread count is put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
