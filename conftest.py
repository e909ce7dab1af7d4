"""pytest settings for test_all.py: the `slow` marker (end-to-end runs of the programs)."""


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: runs a program end to end (pytest -m "not slow" test_all.py skips them)')
