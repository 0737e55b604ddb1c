"""Name -> class registries (compressors, attacks): one decorator, one lookup, one error.

    COMPRESSORS = Registry("compressor", Compressor)

    @COMPRESSORS.register("dgp")
    class DGPCompressor(Compressor): ...

    COMPRESSORS.build("dgp", top=0.05)   # DGPCompressor(top=0.05)
    COMPRESSORS.names()                  # ['dgp', ...]
    COMPRESSORS.get("dgp")               # the class

``build`` checks the keyword names against the constructor's signature first, so a typo
raises ``TypeError`` listing the accepted parameters instead of Python's generic message;
an unknown name raises ``ValueError`` listing the known ones.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Generic, List, Type, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes derived from ``base``, registered by name (``kind`` names them in errors)."""

    def __init__(self, kind: str, base: Type[T]) -> None:
        self.kind = kind
        self.base = base
        self._classes: Dict[str, Type[T]] = {}

    def register(self, name: str) -> Callable[[Type[T]], Type[T]]:
        """Class decorator: register the class under ``name`` and set its ``name`` attribute."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def deco(cls: Type[T]) -> Type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(
                    f"@register({name!r}) must decorate a {self.base.__name__} subclass, got {cls!r}")
            old = self._classes.get(name)
            if old is not None and old is not cls:
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered by {old.__qualname__}")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when it is not registered): for tests and plugins that
        register a class for a while."""
        self._classes.pop(name, None)

    def names(self) -> List[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def get(self, name: str) -> Type[T]:
        """The class registered as ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__} {name!r}")
        cls = self._classes.get(name)
        if cls is None:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        return cls

    def parameters(self, name: str) -> List[str]:
        """The keyword parameters the constructor of ``name`` accepts."""
        sig = inspect.signature(self.get(name).__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def build(self, name: str, **params: Any) -> T:
        """An instance of ``name`` built with keyword ``params`` (names checked first)."""
        cls = self.get(name)
        accepted = self.parameters(name)
        takes_kwargs = any(p.kind is p.VAR_KEYWORD
                           for p in inspect.signature(cls.__init__).parameters.values())
        if not takes_kwargs:
            for key in params:
                if key not in accepted:
                    raise TypeError(
                        f"{self.kind} {name!r} has no parameter {key!r}; its parameters are: "
                        f"{', '.join(accepted) or '(none)'}")
        return cls(**params)
