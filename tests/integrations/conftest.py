"""Say which transformers line the integration tests ran against (CI runs two)."""


def pytest_report_header(config):
    try:
        import transformers
    except ImportError:
        return "transformers: not installed (integration tests skipped)"
    return f"transformers: {transformers.__version__} ({transformers.__file__})"
