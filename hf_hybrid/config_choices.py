"""The allowed values of each enumerated ``HybridConfig`` field. A leaf module: the config validates its own
fields against ``_CHOICES``; a layer kind declares the choices of its fields in its spec
(``ConfigField(choices=...)``, in the kind's file), and :data:`FIELD_CHOICES` shows both to tools and
converters that offer the same choices, without importing the config.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# The config's own enumerated fields.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2"),
    "qk_norm_scope": ("head", "full"),
    "hyper_connections": ("none", "ihc", "mhc"),
}


class _FieldChoices(Mapping):
    """``{field: allowed values}`` of the config's fields and of the registered kinds' fields (read-only;
    the kinds' are read from the registry on access, which imports the built-in kinds)."""

    def _table(self) -> dict[str, tuple[Any, ...]]:
        from .registry import mixer_specs, mlp_specs

        table = dict(_CHOICES)
        for spec in (*mixer_specs().values(), *mlp_specs().values()):
            table.update({f.name: f.choices for f in spec.config_fields if f.choices is not None})
        return table

    def __getitem__(self, name: str) -> tuple[Any, ...]:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


# The allowed values of each enumerated field, for tools and converters that offer the same choices.
FIELD_CHOICES: Mapping[str, tuple[Any, ...]] = _FieldChoices()

__all__ = ["FIELD_CHOICES"]
