import pytest

from tests.harness import World


@pytest.fixture(scope="session")
def world2():
    world = World(2)
    yield world
    world.close()


@pytest.fixture(scope="session")
def world4():
    world = World(4)
    yield world
    world.close()


@pytest.fixture(scope="session")
def world8():
    world = World(8)
    yield world
    world.close()
