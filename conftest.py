"""Repository-wide pytest set-up: the demo workspace the notebooks run on under nbval.

The notebooks' committed defaults point at `build/demo-workspace`; when any notebook
is collected it is rebuilt fresh (deterministic, under a second), so nbval runs the
notebooks as stored on known data.
"""
from pathlib import Path

DEMO_WORKSPACE = Path(__file__).parent / "build" / "demo-workspace"


def pytest_collection_finish(session):
    if any(str(item.path).endswith(".ipynb") for item in session.items):
        from zoolib import demo

        demo.build(DEMO_WORKSPACE)
