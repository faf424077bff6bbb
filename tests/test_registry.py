"""The generic registry and the registries built on it (one error for every unknown name)."""

import pytest

from kdbackdoor.attacks.engines import ENGINES
from kdbackdoor.data.source_registry import SOURCES
from kdbackdoor.data.sources import available_datasets
from kdbackdoor.defenses.filters.base import FILTERS
from kdbackdoor.distill.data_free_config import METHOD_DEFAULTS
from kdbackdoor.distill.synthesis import SYNTHESIZERS
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.registry import ARCHITECTURES
from kdbackdoor.registry import Registry, UnknownNameError
from kdbackdoor.triggers.registry import TRIGGERS


def test_lookup_registration_order_and_sorted_names():
    shapes = Registry("shape")
    shapes.add("square", 4)
    shapes.register("circle")(0)
    assert shapes["square"] == 4 and list(shapes) == ["square", "circle"] and shapes.names() == ["circle", "square"]
    assert "circle" in shapes and "oval" not in shapes and shapes.get("oval") is None and len(shapes) == 2


def test_unknown_name_is_a_user_error_that_lists_the_names():
    shapes = Registry("shape", hint=" (or all)")
    shapes.add("square", 4)
    shapes.add("circle", 0)
    with pytest.raises(KDBackdoorError) as caught:
        shapes["oval"]
    assert isinstance(caught.value, UnknownNameError)
    assert str(caught.value) == "unknown shape 'oval'; available: square, circle (or all)"


def test_a_name_registers_once():
    shapes = Registry("shape")
    shapes.add("square", 4)
    with pytest.raises(ValueError, match="shape 'square' is registered twice"):
        shapes.add("square", 5)
    assert shapes["square"] == 4


def test_names_items_gives_a_class_its_name():
    kinds = Registry("kind", names_items=True)

    @kinds.register("red")
    class Red:
        name = ""

    assert Red.name == "red" and kinds["red"] is Red


def test_usage_shows_names_as_users_write_them():
    with pytest.raises(KDBackdoorError, match=r"unknown data set 'mnist:x'; available: .*imagefolder:PATH.*npz:PATH"):
        SOURCES["mnist:x"]
    assert sorted(SOURCES.available().split(", ")) == available_datasets()


@pytest.mark.parametrize("registry, kind, known", [
    (TRIGGERS, "trigger", "badnets-square"), (ARCHITECTURES, "architecture", "small-cnn"),
    (SOURCES, "data set", "digits"), (FILTERS, "filter", "spectral"), (ENGINES, "engine", "pgd"),
    (SYNTHESIZERS, "data-free method", "zskt"),
])
def test_every_kind_uses_the_one_registry_and_its_error(registry, kind, known):
    assert isinstance(registry, Registry) and known in registry
    with pytest.raises(UnknownNameError, match=rf"^unknown {kind} 'nope'; available: .*{known}"):
        registry["nope"]


def test_every_data_free_method_has_a_synthesiser_and_defaults():
    assert sorted(SYNTHESIZERS) == sorted(METHOD_DEFAULTS)
