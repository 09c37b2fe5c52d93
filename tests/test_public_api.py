"""The public surface of the ``mcs`` package: what it exports and how exported names look."""

from __future__ import annotations

import importlib.resources
import inspect
import types

import pytest

import mcs

CLASSES = sorted(name for name in mcs.__all__ if inspect.isclass(getattr(mcs, name)))
DOCUMENTED = sorted(
    name
    for name in mcs.__all__
    if inspect.isclass(getattr(mcs, name)) or inspect.isfunction(getattr(mcs, name))
)


def public_names() -> set[str]:
    return {
        name
        for name, value in vars(mcs).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_sorted() -> None:
    assert mcs.__all__ == sorted(mcs.__all__)


def test_classes_are_found() -> None:
    assert {"Batcher", "RateLimit", "Overloaded"} <= set(CLASSES)


def test_all_lists_exactly_the_public_names() -> None:
    assert len(mcs.__all__) == len(set(mcs.__all__))
    assert set(mcs.__all__) == public_names()


def test_the_documented_batcher_api_is_exported() -> None:
    expected = {
        "BatchFn",
        "BatchResultError",
        "Batcher",
        "BatcherStatistics",
        "MCSError",
        "Overloaded",
        "Percentiles",
        "RateLimit",
        "open_batcher",
    }
    assert expected <= set(mcs.__all__)


@pytest.mark.parametrize("name", CLASSES)
def test_exported_classes_belong_to_mcs(name: str) -> None:
    value = getattr(mcs, name)
    assert value.__module__ == "mcs"
    assert repr(value) == f"<class 'mcs.{name}'>"


FUNCTIONS = sorted(name for name in mcs.__all__ if inspect.isfunction(getattr(mcs, name)))


def test_functions_are_found() -> None:
    assert {"open_batcher", "open_graph", "autoscale"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_exported_functions_belong_to_mcs(name: str) -> None:
    value = getattr(mcs, name)
    assert value.__module__ == "mcs"
    assert value.__qualname__ == name


@pytest.mark.parametrize("name", DOCUMENTED)
def test_exported_classes_and_functions_have_docstrings(name: str) -> None:
    assert inspect.getdoc(getattr(mcs, name))


@pytest.mark.parametrize("name", ["Batcher", "RateLimit", "BatcherStatistics", "Percentiles"])
def test_public_methods_and_properties_have_docstrings(name: str) -> None:
    cls = getattr(mcs, name)
    undocumented = [
        attribute
        for attribute, value in vars(cls).items()
        if not attribute.startswith("_")
        and (inspect.isfunction(value) or isinstance(value, property))
        and not inspect.getdoc(value)
    ]
    assert undocumented == []


def test_the_exception_tree() -> None:
    assert issubclass(mcs.MCSError, Exception)
    assert issubclass(mcs.Overloaded, mcs.MCSError)
    assert issubclass(mcs.BatchResultError, mcs.MCSError)
    assert not issubclass(mcs.Overloaded, mcs.BatchResultError)


def test_the_package_is_typed() -> None:
    assert (importlib.resources.files("mcs") / "py.typed").is_file()


def test_the_version_is_a_string() -> None:
    assert isinstance(mcs.__version__, str)
    assert "__version__" not in mcs.__all__
