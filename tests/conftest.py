import sys
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401
# graphopt counts MACs with torch's FlopCounterMode, whose first use imports torch._dynamo and
# registers torch op libraries; pytester's in-process runs unload what they imported and the
# next run would register those libraries twice, so they are imported here, once.

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def registry():
    """The built-in plugins, as the CLI loads them."""
    import graphopt
    return graphopt.load_plugins()

pytest_plugins = ["pytester"]
