"""Say which transformers line the integration tests ran against (CI runs two), and run each test on
one intra-op thread."""
import pytest


def pytest_report_header(config):
    try:
        import transformers
    except ImportError:
        return "transformers: not installed (integration tests skipped)"
    return f"transformers: {transformers.__version__} ({transformers.__file__})"


@pytest.fixture(autouse=True)
def _each_test_on_one_intra_op_thread(one_intra_op_thread):
    """Tiny models throughout: see ``one_intra_op_thread`` in tests/conftest.py."""
