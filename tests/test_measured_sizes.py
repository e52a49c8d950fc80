"""What a replica measured above the estimate reaches the router: router/measured_sizes.py
(pure) and RouterCore's second call with the raised need (a fake handle: the call's answer
is all it reads)."""

from __future__ import annotations

import asyncio

import pytest

from router.measured_sizes import MeasuredSizes
from router.placement import Need


def _need(weights: dict[str, int], workspace: int = 10, name: str = "ck") -> Need:
    return Need(name, dict(weights), dict.fromkeys(weights, workspace))


def _too_big(measured: int, estimate: int) -> dict:
    return {"status": 413, "error": {"code": "exceeds_replica_budget", "message": "m"}, "need_bytes": measured + 10,
            "budget_bytes": 150, "measured_weights_bytes": measured, "estimate_weights_bytes": estimate}


def test_a_413_with_a_measure_above_the_estimate_raises_the_need_at_that_estimate():
    sizes = MeasuredSizes()
    need = _need({"float16": 100, "bfloat16": 100, "float32": 200})
    raised = sizes.learn(_too_big(130, 100), need)
    # float16 and bfloat16 were planned at the same 100 bytes: both take the measure
    assert raised.weights_bytes == {"float16": 130, "bfloat16": 130, "float32": 200}
    assert raised.workspace_bytes == need.workspace_bytes and raised.checkpoint == "ck"
    # a later request's need (the same estimate) is raised before its first call
    assert sizes.adjust(_need({"float16": 100, "bfloat16": 100, "float32": 200})).weights_bytes == raised.weights_bytes
    # another checkpoint, or a new estimate (its files replaced), is planned afresh
    other = _need({"float16": 100}, name="other")
    assert sizes.adjust(other) is other
    replaced = _need({"float16": 105, "bfloat16": 105, "float32": 210})
    assert sizes.adjust(replaced) is replaced


@pytest.mark.parametrize("result", [
    {"status": 503, "error": {"code": "replica_busy", "message": "m"}, "measured_weights_bytes": 130,
     "estimate_weights_bytes": 100},
    {"status": 413, "error": {"code": "exceeds_every_budget", "message": "m"}, "measured_weights_bytes": 130,
     "estimate_weights_bytes": 100},
    {"status": 413, "error": {"code": "exceeds_replica_budget", "message": "m"}},  # an older replica
    _too_big(100, 100),  # the estimate alone is over that replica's budget: nothing new
    _too_big(90, 100),
    _too_big(130, 99),  # planned with an estimate this need does not have (files changed between)
    {"status": 200},
])
def test_nothing_is_learned_from_other_answers(result):
    sizes = MeasuredSizes()
    assert sizes.learn(result, _need({"float16": 100})) is None
    assert len(sizes) == 0


def test_the_most_recently_learned_are_kept():
    sizes = MeasuredSizes(max_entries=2)
    for name in ("a", "b", "c"):
        sizes.learn(_too_big(130, 100), _need({"float16": 100}, name=name))
    assert len(sizes) == 2
    assert [sizes.adjust(_need({"float16": 100}, name=n)).weights_bytes["float16"] for n in "abc"] == [100, 130, 130]
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        MeasuredSizes(max_entries=0)


class _Handle:
    """The replica deployment's handle: answers each generate call from ``answers`` and
    records the need it was sent with."""

    app_name, deployment_name = "memrouter", "ModelReplica"

    def __init__(self, answers: list[dict]):
        self.generate, self.answers, self.needs = self, list(answers), []

    def remote(self, payload, need):
        self.needs.append(need)
        done = asyncio.get_running_loop().create_future()
        done.set_result(self.answers.pop(0))
        return done


def _core(demo_dir, answers: list[dict], budget_bytes: int | None = None):
    from deployments.demo import demo_registry_entries
    from router.core import RouterCore, ServiceError
    from router.registry import Registry
    from router.settings import IngressSettings

    handle = _Handle(answers)
    core = RouterCore(handle, Registry.from_entries(demo_registry_entries(next(iter(demo_dir.values())).parent)),
                      IngressSettings())
    admitted = []

    async def admit(need):  # admission against one replica budget, as _judge does with reports
        admitted.append(need)
        biggest = max(w + need.workspace_bytes[d] for d, w in need.weights_bytes.items())
        if budget_bytes is not None and biggest > budget_bytes:
            raise ServiceError(413, "exceeds_every_budget", "over")

    core.admit = admit
    return core, handle, admitted


def test_the_router_asks_again_with_the_measured_size_and_plans_later_requests_with_it(demo_dir):
    """The replica measured the checkpoint above its estimate and over its budget (413): the
    same request goes out once more with the need raised to the measure (placement then
    ranks only replicas it fits), and the next request goes out with it from the start."""
    from router.api import GenerateRequest
    from router.core import ServiceError

    busy = {"status": 503, "error": {"code": "replica_busy", "message": "full"}, "retry_after_s": 1}
    core, handle, admitted = _core(demo_dir, [])
    first_need, _ = core.need(core.registry.get("demo-xs"), 64, 64, 1)
    estimate = first_need.weights_bytes["float16"]
    handle.answers = [_too_big(estimate + 1000, estimate), busy, busy]
    req = GenerateRequest.model_validate({"checkpoint": "demo-xs", "prompt": "p"})

    async def run():
        for _ in range(2):
            with pytest.raises(ServiceError) as err:
                await core.generate(req)
            assert err.value.code == "replica_busy"  # the second call's answer

    asyncio.run(run())
    sent = [n.weights_bytes["float16"] for n in handle.needs]
    assert sent == [estimate, estimate + 1000, estimate + 1000]
    assert [n.weights_bytes["float16"] for n in admitted] == sent  # admission judged each


def test_a_measure_no_replica_fits_is_refused_at_admission_from_then_on(demo_dir):
    from router.api import GenerateRequest
    from router.core import ServiceError

    core, handle, _ = _core(demo_dir, [])
    need, _ = core.need(core.registry.get("demo-xs"), 64, 64, 1)
    estimate, workspace = need.at("float16")
    # the estimate fits the one budget; the measure does not
    core, handle, _ = _core(demo_dir, [_too_big(estimate + 1000, estimate)], budget_bytes=estimate + workspace + 500)
    req = GenerateRequest.model_validate({"checkpoint": "demo-xs", "prompt": "p"})
    for _ in range(2):
        with pytest.raises(ServiceError) as err:
            asyncio.run(core.generate(req))
        assert (err.value.status, err.value.code) == (413, "exceeds_every_budget")
    assert len(handle.needs) == 1  # one replica call: the second request never left the router


def test_synchronous_callers_ask_again_too(demo_dir):
    """LocalRouter's path (generate_sync): the same second call with the raised need."""
    from router.api import GenerateRequest
    from router.core import ServiceError

    class Answer:
        def __init__(self, result):
            self._result = result

        def result(self, timeout_s=None):
            return self._result

    core, handle, _ = _core(demo_dir, [])
    need, _ = core.need(core.registry.get("demo-xs"), 64, 64, 1)
    estimate = need.weights_bytes["float16"]
    answers = [_too_big(estimate + 1000, estimate), {"status": 503, "error": {"code": "replica_busy", "message": "m"}}]
    sent = []

    def remote(payload, need):
        sent.append(need.weights_bytes["float16"])
        return Answer(answers.pop(0))

    handle.remote = remote
    core.admit_sync = lambda need: None
    with pytest.raises(ServiceError) as err:
        core.generate_sync(GenerateRequest.model_validate({"checkpoint": "demo-xs", "prompt": "p"}))
    assert err.value.code == "replica_busy" and sent == [estimate, estimate + 1000]


def test_the_second_call_is_stamped_anew_and_shares_the_request_timeout(demo_dir):
    """The replica counts its queue time from the call's sent_at_s (the second call must not
    count the first one's load as queue), and both calls share one request_timeout_s: the
    second gets what is left (review of stop 20: each had the whole timeout, up to 2x)."""
    import time

    from router.api import GenerateRequest
    from router.core import ServiceError
    from router.settings import IngressSettings

    core, handle, _ = _core(demo_dir, [])
    core.settings = IngressSettings(request_timeout_s=0.5)
    need, _ = core.need(core.registry.get("demo-xs"), 64, 64, 1)
    estimate = need.weights_bytes["float16"]
    payloads = []

    def remote(payload, need):
        payloads.append(payload)
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        if len(payloads) == 1:  # a 413 after 0.4 s (a load that measured too big)
            loop.call_later(0.4, answer.set_result, _too_big(estimate + 1000, estimate))
        return answer  # the second never answers

    handle.remote = remote
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        asyncio.run(core.generate(GenerateRequest.model_validate({"checkpoint": "demo-xs", "prompt": "p"})))
    elapsed_s = time.monotonic() - t0
    assert (err.value.status, err.value.code) == (504, "timeout")
    assert 0.45 <= elapsed_s < 0.8  # one timeout (0.5 s), not two (0.9 s)
    assert len(payloads) == 2 and payloads[1]["sent_at_s"] - payloads[0]["sent_at_s"] >= 0.35
