"""Fakes for pure-policy unit tests: a clock and a cache backend that records every call."""

from __future__ import annotations

from dataclasses import dataclass, field


class FakeClock:
    def __init__(self, start_s: float = 1000.0):
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class FakeModel:
    name: str
    where: str = "device"
    freed: bool = False


@dataclass
class FakeBackend:
    """Sizes by name; ``measured_delta`` makes a load measure above/below its estimate."""

    sizes: dict[str, int]
    measured_delta: dict[str, int] = field(default_factory=dict)
    fail_load: set[str] = field(default_factory=set)
    # Raise once on the next to_host / to_device / free of these names (then work again).
    fail_to_host: set[str] = field(default_factory=set)
    fail_to_device: set[str] = field(default_factory=set)
    fail_free: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    leaks: int = 0

    def load(self, name: str) -> FakeModel:
        self.calls.append(("load", name))
        if name in self.fail_load:
            raise RuntimeError(f"injected load failure for {name}")
        return FakeModel(name)

    def measure(self, obj: FakeModel) -> int:
        return self.sizes[obj.name] + self.measured_delta.get(obj.name, 0)

    @staticmethod
    def _maybe_fail(names: set[str], op: str, name: str) -> None:
        if name in names:
            names.discard(name)
            raise RuntimeError(f"injected {op} failure for {name}")

    def to_host(self, obj: FakeModel) -> None:
        self._maybe_fail(self.fail_to_host, "to_host", obj.name)
        assert obj.where == "device" and not obj.freed
        obj.where = "host"
        self.calls.append(("to_host", obj.name))

    def to_device(self, obj: FakeModel) -> None:
        self._maybe_fail(self.fail_to_device, "to_device", obj.name)
        assert obj.where == "host" and not obj.freed
        obj.where = "device"
        self.calls.append(("to_device", obj.name))

    def free(self, obj: FakeModel) -> None:
        self._maybe_fail(self.fail_free, "free", obj.name)
        assert not obj.freed, f"{obj.name} freed twice"
        obj.freed = True
        self.calls.append(("free", obj.name))

    def leaked(self) -> int:
        return self.leaks
