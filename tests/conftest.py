import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def registry():
    """The built-in plugins, as the CLI loads them."""
    import graphopt
    return graphopt.load_plugins()

pytest_plugins = ["pytester"]
