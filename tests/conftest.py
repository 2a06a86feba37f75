import pytest

from tests.helpers import OPENCLIPART


@pytest.fixture(scope="session")
def openclipart_root():
    """The real OpenClipart tree (fetched by `make test` through `dudch data openclipart`)."""
    if not OPENCLIPART.is_dir():
        pytest.fail("data/openclipart is missing: run `make test` (or `dudch data openclipart`) first")
    return OPENCLIPART
