"""Several models on one server: routing by name, first-use loading, LRU eviction, health and metrics per model."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
import weakref

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearn_async import ConfigError, ModelNotFound, RemoteTrunk, SessionNotFound, SplitPipeline, split_model
from splitlearn_async import protocol as proto
from splitlearn_async.errors import PreconditionFailed, TrunkBusy
from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig
from splitlearn_async.server._cli import named_models
from splitlearn_async.server._models import ModelSource, model_bytes
from tests.support.tiny_models import left_padded_batch, tiny_model

SPLIT = (2, 4)
FAMILIES = {"a": "llama", "b": "gpt2", "c": "qwen2"}


class Loads:
    """Model sources that count their loads and keep each stage set of the model they load."""

    def __init__(self, same_size: bool = False) -> None:
        """``same_size``: three llama models of different seeds (equal bytes, for the budget tests)."""
        self.count = {name: 0 for name in FAMILIES}
        self.models = {
            name: tiny_model("llama", seed=i) if same_size else tiny_model(family)
            for i, (name, family) in enumerate(FAMILIES.items())
        }
        self.trunks: dict[str, list[weakref.ref]] = {name: [] for name in FAMILIES}
        self.nbytes = model_bytes(split_model(self.models["a"], SPLIT, parts=("trunk",)).trunk)

    def source(self, name: str, nbytes: int | None = None) -> ModelSource:
        def load():
            self.count[name] += 1
            trunk = split_model(_copy(self.models[name]), SPLIT, parts=("trunk",)).trunk
            self.trunks[name].append(weakref.ref(trunk))
            return trunk

        return ModelSource(load, nbytes, description=f"tiny model {name}")

    def sources(self, names: str = "abc", with_sizes: bool = True) -> dict[str, ModelSource]:
        return {n: self.source(n, self.nbytes if with_sizes else None) for n in names}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


async def _generate(port: int, model_name: str | None, model: torch.nn.Module) -> torch.Tensor:
    bottom, _, top = split_model(model, SPLIT)
    ids, mask = left_padded_batch([5, 3], seed=2)
    async with RemoteTrunk(f"127.0.0.1:{port}", model=model_name) as remote, SplitPipeline(bottom, remote, top) as p:
        return await p.generate(ids, mask, max_new_tokens=6, pad_token_id=0)


def _expected(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = left_padded_batch([5, 3], seed=2)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)


async def test_each_call_runs_on_the_model_it_names_and_equals_model_generate():
    loads = Loads()
    async with AsyncGRPCComputeServer(loads.sources("ab")) as server:
        assert server.models.names == ["a", "b"] and not any(s.loaded for s in server.models.slots.values())
        got = await asyncio.gather(
            _generate(server.port, "a", loads.models["a"]),
            _generate(server.port, "b", loads.models["b"]),
            _generate(server.port, None, loads.models["a"]),  # no name: the first model
        )
        assert loads.count == {"a": 1, "b": 1, "c": 0}  # loaded once each, on first use
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="b") as remote:
            info = await remote.info()
        assert info["model"] == "b" and info["family"] == "gpt2"
        assert [m["name"] for m in info["models"]] == ["a", "b"] and all(m["loaded"] for m in info["models"])
    assert torch.equal(got[0], _expected(loads.models["a"]))
    assert torch.equal(got[1], _expected(loads.models["b"]))
    assert torch.equal(got[2], got[0])


async def test_an_unknown_model_gets_not_found_with_the_names_and_the_server_goes_on():
    loads = Loads()
    async with AsyncGRPCComputeServer(loads.sources("ab")) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="zz") as remote:
            # NOT_FOUND reads back as SessionNotFound, ModelNotFound's parent (the status table)
            with pytest.raises(SessionNotFound, match=r"NOT_FOUND: this server has no model 'zz'; it serves \['a', 'b'\]"):
                await remote.info()
        assert loads.count["a"] == 0  # refused before anything was loaded
        assert torch.equal(await _generate(server.port, "a", loads.models["a"]), _expected(loads.models["a"]))
    with pytest.raises(ConfigError, match="model name"):
        RemoteTrunk("127.0.0.1:1", model="../etc")


async def test_concurrent_first_calls_load_a_model_once():
    loads = Loads()
    async with AsyncGRPCComputeServer(loads.sources("a")) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="a") as remote:
            infos = await asyncio.gather(*(remote.info() for _ in range(8)))
    assert loads.count["a"] == 1 and all(i["model"] == "a" for i in infos)


async def test_idle_models_are_evicted_least_recently_used_under_the_budget():
    loads = Loads(same_size=True)
    config = ServerConfig(max_model_bytes=2 * loads.nbytes)  # room for two of the three
    async with AsyncGRPCComputeServer(loads.sources("abc"), config=config) as server:
        for name in "ab":
            await _generate(server.port, name, loads.models[name])
        await _generate(server.port, "a", loads.models["a"])  # a is now the more recent
        await _generate(server.port, "c", loads.models["c"])  # evicts b, the least recently used
        loaded = {s.name for s in server.models.slots.values() if s.loaded}
        assert loaded == {"a", "c"} and server.models.evictions == 1
        gc.collect()
        assert loads.trunks["b"][0]() is None, "the evicted trunk is still referenced"
        assert server.models.loaded_bytes <= config.max_model_bytes
        got = await _generate(server.port, "b", loads.models["b"])  # loaded again, evicting a
        assert loads.count == {"a": 1, "b": 2, "c": 1}
        assert {s.name for s in server.models.slots.values() if s.loaded} == {"b", "c"}
    assert torch.equal(got, _expected(loads.models["b"]))


async def test_a_model_in_use_is_never_evicted_and_a_full_budget_answers_resource_exhausted():
    loads = Loads(same_size=True)
    config = ServerConfig(max_model_bytes=loads.nbytes)  # room for one
    async with AsyncGRPCComputeServer(loads.sources("ab"), config=config) as server:
        bottom, _, top = split_model(loads.models["a"], SPLIT)
        ids, mask = left_padded_batch([4])
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="a") as remote:
            session = await remote.open_session()
            positions = torch.arange(ids.shape[1])[None]
            with torch.no_grad():
                await session.forward(bottom(ids, mask, positions), mask, positions)  # a session stays open on a
            async with RemoteTrunk(f"127.0.0.1:{server.port}", model="b") as other:
                with pytest.raises(TrunkBusy, match=r"max_model_bytes=\d+ .*no loaded model is idle \(a: 1 call"):
                    await other.info()
            await session.aclose()
        assert loads.count == {"a": 1, "b": 0, "c": 0}
        assert torch.equal(await _generate(server.port, "b", loads.models["b"]), _expected(loads.models["b"]))
        assert [s.name for s in server.models.slots.values() if s.loaded] == ["b"]


async def test_a_model_holding_an_adapter_is_not_idle():
    from splitlearn_async.training import LoraConfig

    loads = Loads(same_size=True)
    config = ServerConfig(max_model_bytes=loads.nbytes)
    async with AsyncGRPCComputeServer(loads.sources("ab"), config=config) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="a") as remote:
            lora = LoraConfig(rank=2, target_modules=("q_proj",))
            training = await remote.open_training("lora", lora=lora, adapter_id="mine")
            await training.aclose()  # the session closes; its adapter stays loaded
        assert server.models.slots["a"].busy_reason() == "1 adapter(s)"
        async with RemoteTrunk(f"127.0.0.1:{server.port}", model="b") as other:
            with pytest.raises(TrunkBusy, match=r"a: 1 adapter\(s\)"):
                await other.info()


async def test_a_model_that_fails_to_load_is_not_serving_and_the_others_serve():
    def broken():
        raise OSError("model.safetensors: permission denied")

    loads = Loads()
    sources = {"a": loads.source("a"), "bad": ModelSource(broken, description="broken")}
    async with AsyncGRPCComputeServer(sources) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            health = health_pb2_grpc.HealthStub(chan)

            async def status(service: str) -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            assert await status("a") == health_pb2.HealthCheckResponse.SERVING
            assert await status("bad") == health_pb2.HealthCheckResponse.SERVING  # not tried yet
            async with RemoteTrunk(f"127.0.0.1:{server.port}", model="bad") as remote:
                with pytest.raises(PreconditionFailed, match="model 'bad' could not be loaded.*permission denied"):
                    await remote.info()
            assert await status("bad") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await status("zz")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert server.models.slots["bad"].failure == "OSError: model.safetensors: permission denied"
        assert torch.equal(await _generate(server.port, "a", loads.models["a"]), _expected(loads.models["a"]))


async def test_metrics_and_the_status_page_are_per_model():
    loads = Loads()
    async with AsyncGRPCComputeServer(loads.sources("ab"), config=ServerConfig(metrics_port=0)) as server:
        await _generate(server.port, "b", loads.models["b"])
        base = f"http://127.0.0.1:{server.metrics_port}"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode())
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{base}/status", timeout=10).read().decode())
    assert 'splitlearn_trunk_model_loaded{model="a"} 0.0' in text
    assert 'splitlearn_trunk_model_loaded{model="b"} 1.0' in text
    assert f'splitlearn_trunk_model_bytes{{model="b"}} {float(server.models.slots["b"].nbytes)}' in text
    assert server.models.slots["b"].nbytes > 0
    assert 'splitlearn_trunk_batch_size_count{model="b"}' in text
    assert 'splitlearn_trunk_batch_size_count{model="a"}' not in text  # a never ran a step
    assert "<table id='models'>" in page and "<th>b</th><td>yes</td>" in page and "<th>a</th><td>no</td>" in page


async def test_splitlearn_serve_with_two_named_bundles(tmp_path):
    """``splitlearn serve --model a=BUNDLE --model b=BUNDLE --max-model-bytes N``, a real process."""
    from splitlearn_async import save_stages
    from splitlearn_async.server import ServerProcess

    loads = Loads()
    for name in "ab":
        save_stages(split_model(loads.models[name], SPLIT), tmp_path / name)
    args = ["--model", f"a={tmp_path / 'a'}", "--model", f"b={tmp_path / 'b'}", "--max-model-bytes", "100000000"]
    knobs = ["--training-batch-tokens", "0", "--training-batch-wait", "0.02"]  # the training knobs reach the server
    with ServerProcess(None, extra_args=[*args, *knobs, "--torch-threads", "1"]) as server:
        got_b = await _generate(server.port, "b", loads.models["b"])
        got_a = await _generate(server.port, None, loads.models["a"])
        async with RemoteTrunk(server.address, model="b") as remote:
            info = await remote.info()
    assert torch.equal(got_b, _expected(loads.models["b"])) and torch.equal(got_a, _expected(loads.models["a"]))
    assert info["max_model_bytes"] == 100000000 and [m["name"] for m in info["models"]] == ["a", "b"]
    assert info["batch_tokens"] is None and info["batch_wait_s"] == 0.02


def test_a_model_name_is_checked_and_the_cli_form_is_parsed():
    assert named_models(["a=/x", "b-2=/y"]) == {"a": "/x", "b-2": "/y"}
    assert named_models(["/x"]) is None and named_models(None) is None
    with pytest.raises(ConfigError, match="NAME=BUNDLE"):
        named_models(["a=/x", "/y"])
    with pytest.raises(ConfigError, match="names 'a' twice"):
        named_models(["a=/x", "a=/y"])
    with pytest.raises(ConfigError, match="without names"):
        named_models(["/x", "/y"])
    with pytest.raises(ConfigError, match="model name"):
        named_models(["-a=/x"])
    with pytest.raises(ConfigError, match="max_model_bytes"):
        ServerConfig(max_model_bytes=0)
    with pytest.raises(ConfigError, match="at least one model"):
        AsyncGRPCComputeServer({})
    server = AsyncGRPCComputeServer({"a": ModelSource(lambda: None)})
    with pytest.raises(ModelNotFound, match=r"no model 'b'; it serves \['a'\]"):
        server.models.slot("b")
    assert proto.requested_model([("Splitlearn-Model", "x")]) == "x"
