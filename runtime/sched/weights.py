"""One copy of the weights for serving and training: the version counter, pinning, and byte accounting.

The serving engine and the trainer hold the *same* module object, so there is nothing to copy or reshard:
an optimizer step writes the sharded parameters in place, between two scheduler steps (never during a
serving forward, since one loop runs both). What serving derives from the weights is refreshed then:
the absorbed MLA matrices are recomputed from `kv_b_proj` on every serving step (nothing stale to keep),
and the prefix cache, whose latents were computed with the old weights, is emptied so no new request
reuses them. Running requests keep their own KV pages and continue on the new weights (the default);
each token says which version computed it.

`pin_weights`: a request sees one version. An optimizer step waits while any request that has produced a
token is in flight; meanwhile no new request is admitted (the engine's batch is capped at the requests
already running), so the step comes once those drain. A request that has produced nothing yet simply
starts after the step, on the new version. (Under KV pressure a started request preempted during the drain
is re-admitted before new ones of the same priority, so the drain still ends.)
"""

from __future__ import annotations

from torch import nn

__all__ = ["WeightVersions", "param_bytes", "param_storages"]


def param_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes of this rank's parameters (and buffers), each storage counted once."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def param_storages(model: nn.Module) -> set[int]:
    """Storage addresses of the parameters: two objects share weights iff these sets are equal."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


class WeightVersions:
    """The version of the shared weights: `version` at load (0, or where a resumed server left off), +1 per
    optimizer step.

    `engine` (optional) is the serving engine whose derived state is refreshed on every bump."""

    def __init__(self, engine=None, pin: bool = False, version: int = 0) -> None:
        self.version = version
        self.engine = engine
        self.pin = pin
        self._cap: int | None = None  # the engine's max_batch while a pinned drain holds admission
        self.drained = False  # a drain just ended: its optimizer step goes first

    def bump(self) -> int:
        """Call right after an optimizer step wrote the weights."""
        self.version += 1
        if self.engine is not None:
            self.engine.cache.prefix.clear()  # latents of the old weights must not seed new requests
        return self.version

    def blockers(self) -> int:
        """Requests that started on the current version and are still in flight (pinning waits for them)."""
        if self.engine is None:
            return 0
        return len(self.engine.running) + sum(1 for r in self.engine.waiting if r.output)

    def update_allowed(self) -> bool:
        """Whether an optimizer step may run now; under pinning, starts or continues the drain if not."""
        if not self.pin or self.engine is None:
            return True
        n = self.blockers()
        if n == 0:
            self.drained = self._cap is not None  # the step a drain waited for runs next, before new work
            self.release()
            return True
        if self._cap is None:
            self._cap = self.engine.max_batch
        self.engine.max_batch = max(1, min(self._cap, n))
        return False

    def release(self) -> None:
        """End a drain: the engine admits new requests again."""
        if self._cap is not None and self.engine is not None:
            self.engine.max_batch = self._cap
        self._cap = None
