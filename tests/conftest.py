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


# Tensor-parallel layouts the layer and collective tests run in: (world fixture, tp, dp).
TP_LAYOUTS = {"tp2": ("world2", 2, 1), "tp4": ("world4", 4, 1), "tp2-dp2": ("world4", 2, 2)}


@pytest.fixture(params=TP_LAYOUTS.values(), ids=TP_LAYOUTS.keys())
def tp_layout(request):
    fixture, tp, dp = request.param
    return request.getfixturevalue(fixture), tp, dp
