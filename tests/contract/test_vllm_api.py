"""The `vllm` engine and its weight transport against the real vllm==0.33.0 package (no GPU).

What runs here is our real code: the kwargs builders are fed to vLLM's real
constructors (`EngineArgs`, `SamplingParams`, `WeightTransferConfig`, trainer init
infos); vLLM's `LLM`, which needs a GPU to exist, is replaced by
`create_autospec(LLM)` so every call `VLLMEngine` makes is bound to the real
signature; outputs are real `RequestOutput`s built the way vLLM builds them.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from unittest.mock import create_autospec

import pytest
import ray
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm==0.33.0 is not installed: run scripts/install_vllm_contract.sh")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import WeightTransferConfig  # noqa: E402
from vllm.distributed.weight_transfer import (  # noqa: E402
    ModuleSource, VLLMWeightSyncClient, WeightTransferTrainerFactory)
from vllm.distributed.weight_transfer.base import (  # noqa: E402
    WeightTransferInitRequest, WeightTransferUpdateRequest)
from vllm.distributed.weight_transfer.ipc_engine import (  # noqa: E402
    IPCTrainerInitInfo, IPCTrainerWeightTransferEngine, IPCWeightTransferInitInfo)
from vllm.distributed.weight_transfer.nccl_common import _worker_group_rank  # noqa: E402
from vllm.distributed.weight_transfer.nccl_engine import (  # noqa: E402
    NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine, NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo)
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.utils.import_utils import resolve_obj_by_qualname  # noqa: E402

from vllm.v1.executor.abstract import SLEEP_TAGS as EXECUTOR_SLEEP_TAGS, Executor  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402

from actors.engines import vllm_engine as ve  # noqa: E402
from actors.generator import SLEEP_TAGS, RolloutGenerator  # noqa: E402
from actors import weight_transport_vllm as wt  # noqa: E402
from actors.weight_sync import checksum  # noqa: E402

pytestmark = pytest.mark.contract


def test_the_pinned_version_is_installed():
    assert vllm.__version__ == "0.33.0"


# ---------------------------------------------------------------- construction

@pytest.mark.parametrize("backend", ["nccl", "ipc", None])
def test_llm_kwargs_are_real_engine_args(backend):
    extra = {"enable_sleep_mode": True} if backend == "ipc" else {}
    kw = ve.llm_kwargs("/models/policy", seed=3, tensor_parallel_size=2, gpu_memory_utilization=0.4,
                       dtype="bfloat16", weight_transfer_backend=backend, max_model_len=64, **extra)
    inspect.signature(LLM.__init__).bind(None, **kw)
    # LLM hands everything to EngineArgs; constructing it validates every name and value.
    args = EngineArgs(**kw)
    assert (args.model, args.seed, args.tensor_parallel_size, args.dtype) == ("/models/policy", 3, 2, "bfloat16")
    assert args.gpu_memory_utilization == 0.4 and args.max_model_len == 64
    assert args.enable_prefix_caching is True
    assert args.logprobs_mode == "processed_logprobs"
    assert args.worker_extension_cls == ve.WORKER_EXTENSION
    if backend is None:
        assert args.weight_transfer_config is None
    else:
        assert isinstance(args.weight_transfer_config, WeightTransferConfig)
        assert args.weight_transfer_config.backend == backend
    assert args.enable_sleep_mode is (backend == "ipc")


def test_weight_transfer_config_backends_exist():
    for backend in ("nccl", "ipc"):
        assert WeightTransferConfig(backend=backend).backend == backend
        assert WeightTransferTrainerFactory._registry[backend]() in (
            NCCLTrainerWeightTransferEngine, IPCTrainerWeightTransferEngine)


def test_worker_extension_resolves_and_fits_vllms_worker():
    from vllm.v1.worker.gpu_worker import Worker

    ext = resolve_obj_by_qualname(ve.WORKER_EXTENSION)
    assert ext is ve.ReceivedWeightsExtension
    ours = [a for a in dir(ext) if not a.startswith("__")]
    assert ours and all(a.startswith("instructray_") for a in ours)
    # vLLM asserts this before mixing the extension into its worker class.
    assert not [a for a in ours if hasattr(Worker, a)]
    assert callable(getattr(Worker, "init_weight_transfer_engine"))


@pytest.mark.parametrize("temperature,top_p,seed", [(1.0, 1.0, 5), (0.7, 0.9, None), (1.0, 1.0, 2**63 - 1)])
def test_sampling_params_construct(temperature, top_p, seed):
    sp = SamplingParams(**ve.sampling_params_kwargs(7, temperature, top_p, seed, eos_id=0))
    assert sp.max_tokens == 7 and sp.logprobs == 0 and sp.seed == seed
    assert sp.temperature == temperature and sp.top_p == top_p
    assert sp.top_k == 0 and sp.n == 1 and sp.detokenize is False
    assert sp.stop_token_ids == [0] and sp.ignore_eos is False
    assert 0 in sp.all_stop_token_ids


def test_row_seeds_are_distinct_repeatable_and_fit_vllm():
    seeds = ve.row_seeds(11, 64)
    assert len(set(seeds)) == 64 and seeds == ve.row_seeds(11, 64) and seeds != ve.row_seeds(12, 64)
    assert ve.row_seeds(None, 3) == [None, None, None]
    for s in seeds[:4]:
        assert SamplingParams(**ve.sampling_params_kwargs(4, 1.0, 1.0, s, eos_id=0)).seed == s


def test_generate_kwargs_bind_to_llm_generate():
    params = [SamplingParams(**ve.sampling_params_kwargs(4, 1.0, 1.0, s, 0)) for s in (1, 2)]
    kw = ve.generate_kwargs([[5, 6], [7]], params)
    inspect.signature(LLM.generate).bind(None, **kw)
    keys = TokensPrompt.__required_keys__ | TokensPrompt.__optional_keys__
    assert "prompt_token_ids" in TokensPrompt.__required_keys__
    assert all(set(p) <= keys for p in kw["prompts"])
    assert [p["prompt_token_ids"] for p in kw["prompts"]] == [[5, 6], [7]]


# ---------------------------------------------------------------- outputs -> Samples

def _completion(tokens, logps, flat, finish, top=None):
    """A CompletionOutput as vLLM's output processor fills it (logprobs=0, or 1 with `top`)."""
    lps = create_sample_logprobs(flat)
    for t, (tok, lp) in enumerate(zip(tokens, logps)):
        if top is not None and t in top:  # a top-1 token ranked above the sampled one
            append_logprobs_for_next_position(lps, [tok, top[t][0]], [lp, top[t][1]], [None, None], 2, 1)
        else:
            append_logprobs_for_next_position(lps, [tok], [lp], [None], 1, 0)
    return CompletionOutput(index=0, text="", token_ids=list(tokens), cumulative_logprob=sum(logps),
                            logprobs=lps, finish_reason=finish)


def _request(i, prompt, completion):
    return RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=list(prompt),
                         prompt_logprobs=None, outputs=[completion], finished=True)


@pytest.mark.parametrize("flat", [False, True])
def test_real_outputs_become_left_right_padded_samples(flat):
    eos, pad = 0, 1
    prompts = [[5, 6, 7], [8], [9, 10]]
    outs = [
        _request(0, prompts[0], _completion([11, eos], [-0.5, -0.25], flat, "stop", top={0: (12, -0.1)})),
        _request(1, prompts[1], _completion([12, 13, 14], [-1.0, -2.0, -0.125], flat, "length")),
        _request(2, prompts[2], _completion([eos], [-3.0], flat, "stop", top={0: (4, -0.01)})),
    ]
    s = ve.request_outputs_to_samples(prompts, outs, pad_id=pad)
    # Worked by hand: prompt width 3, response width 3; the EOS is kept and is an action.
    assert s.prompt_width == 3
    assert s.input_ids.tolist() == [[5, 6, 7, 11, 0, 1], [1, 1, 8, 12, 13, 14], [1, 9, 10, 0, 1, 1]]
    assert s.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert s.action_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]
    assert s.sampler_logprobs.tolist() == [[0, 0, 0, -0.5, -0.25, 0], [0, 0, 0, -1.0, -2.0, -0.125],
                                           [0, 0, 0, -3.0, 0, 0]]
    assert s.input_ids.dtype == torch.long and s.sampler_logprobs.dtype == torch.float32


def test_sampled_logprob_is_the_sampled_tokens_entry_not_the_top_one():
    c = _completion([7, 8], [-2.5, -0.75], False, "length", top={0: (3, -0.2), 1: (9, -0.5)})
    assert len(c.logprobs[0]) == 2  # the sampled token and the top-1 token
    assert ve.sampled_logprobs(c) == [-2.5, -0.75]


def test_conversion_refuses_missing_logprobs_and_reordered_rows():
    c = CompletionOutput(index=0, text="", token_ids=[3], cumulative_logprob=None, logprobs=None)
    with pytest.raises(ValueError, match="logprobs"):
        ve.request_outputs_to_samples([[5]], [_request(0, [5], c)], pad_id=1)
    good = _completion([3], [-1.0], False, "length")
    with pytest.raises(ValueError, match="another prompt"):
        ve.request_outputs_to_samples([[5], [6]], [_request(1, [6], good), _request(0, [5], good)], 1)


# ---------------------------------------------------------------- the engine against LLM's spec

@pytest.fixture()
def spy_llm(monkeypatch):
    """vllm.LLM replaced by its autospec: wrong names or arguments raise TypeError."""
    cls = create_autospec(LLM)
    monkeypatch.setattr(vllm, "LLM", cls)
    llm = cls.return_value
    llm.reset_prefix_cache.return_value = True
    llm.get_world_size.return_value = 2
    return cls, llm


def _fake_generate(prompts, sampling_params, use_tqdm):
    """Real RequestOutputs honouring the SamplingParams (EOS first when the seed is even)."""
    outs = []
    for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
        eos = sp.stop_token_ids[0]
        toks = [eos] if sp.seed % 2 == 0 else [20 + j for j in range(sp.max_tokens)]
        lps = create_sample_logprobs(False)
        for j, t in enumerate(toks):
            append_logprobs_for_next_position(lps, [t], [-0.5 * (j + 1)], [None], 1, sp.logprobs)
        outs.append(_request(i, p["prompt_token_ids"],
                             CompletionOutput(0, "", toks, None, lps, finish_reason="stop")))
    return outs


def test_engine_builds_llm_and_samples_through_real_signatures(spy_llm, tiny_policy_dir, tiny_tokenizer):
    cls, llm = spy_llm
    engine = ve.VLLMEngine(str(tiny_policy_dir), seed=3, tensor_parallel_size=1, max_model_len=32)
    (_, kwargs), = [(c.args, c.kwargs) for c in cls.call_args_list]
    assert kwargs == ve.llm_kwargs(str(tiny_policy_dir), seed=3, tensor_parallel_size=1, max_model_len=32)
    EngineArgs(**kwargs)
    llm.collective_rpc.assert_called_once_with("instructray_watch_loads")
    assert (engine.eos_id, engine.pad_id) == (tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    assert engine.eos_id != engine.pad_id

    llm.generate.side_effect = _fake_generate
    prompts = [[5, 6, 7], [8], [5, 6, 7]]
    s = engine.generate(prompts, max_new_tokens=2, seed=9)
    call = llm.generate.call_args
    params = call.kwargs["sampling_params"]
    assert all(isinstance(p, SamplingParams) and p.logprobs == 0 and p.max_tokens == 2 for p in params)
    assert [p.seed for p in params] == ve.row_seeds(9, 3)
    expected_rows = [[engine.eos_id] if seed % 2 == 0 else [20, 21] for seed in ve.row_seeds(9, 3)]
    for i, row in enumerate(expected_rows):
        assert s.input_ids[i, 3: 3 + len(row)].tolist() == row
        assert s.action_mask[i].sum() == len(row)
        assert s.sampler_logprobs[i, 3: 3 + len(row)].tolist() == [-0.5 * (j + 1) for j in range(len(row))]
    with pytest.raises(ValueError):
        engine.generate([[5], []], max_new_tokens=2)


def test_engine_weight_update_calls_bind_and_reset_the_prefix_cache(spy_llm, tiny_policy_dir):
    _, llm = spy_llm
    engine = ve.VLLMEngine(str(tiny_policy_dir), seed=0)
    payload = NCCLTrainerWeightTransferEngine._build_worker_init_payload(
        NCCLTrainerInitInfo(rank=0, master_address="10.0.0.1", master_port=29500, world_size=2))
    engine.init_weight_transfer_engine(payload)
    engine.start_weight_update()
    update = dataclasses.asdict(NCCLWeightTransferUpdateInfo(
        names=["transformer.wte.weight"], dtype_names=["float32"], shapes=[[300, 16]]))
    engine.update_weights(update)
    engine.finish_weight_update(4)
    assert engine.transfer_world_size() == 2
    sent = [("transformer.wte.weight", torch.arange(4.0).view(2, 2))]
    engine.load_weights(sent)
    rpc = llm.collective_rpc.call_args
    assert rpc.args == ("instructray_load_weights",)
    assert checksum(ve.from_wire(rpc.kwargs["args"][0])) == checksum(sent)

    init_req = llm.init_weight_transfer_engine.call_args.args[0]
    assert isinstance(init_req, WeightTransferInitRequest)
    NCCLWeightTransferInitInfo(**init_req.init_info)  # what the worker parses
    upd_req = llm.update_weights.call_args.args[0]
    assert isinstance(upd_req, WeightTransferUpdateRequest)
    assert NCCLWeightTransferUpdateInfo(**upd_req.update_info).names == ["transformer.wte.weight"]
    llm.finish_weight_update.assert_called_once_with(weight_version="4")
    llm.get_world_size.assert_called_once_with(include_dp=False)
    names = [c[0] for c in llm.method_calls]
    after_finish, after_load = names[names.index("finish_weight_update") + 1], names[names.index("collective_rpc", 1) + 1]
    assert after_finish == after_load == "reset_prefix_cache"
    assert names[-1] == "reset_prefix_cache" and names.count("reset_prefix_cache") == 2

    llm.reset_prefix_cache.return_value = False
    with pytest.raises(RuntimeError, match="prefix cache"):
        engine.finish_weight_update(5)


# ---------------------------------------------------------------- colocated: sleep and wake

def test_colocated_kwargs_are_real_engine_args():
    kw = ve.llm_kwargs("/models/policy", seed=0, **ve.colocated_kwargs(0.3))
    inspect.signature(LLM.__init__).bind(None, **kw)
    args = EngineArgs(**kw)
    assert args.enable_sleep_mode is True and args.gpu_memory_utilization == 0.3
    assert args.weight_transfer_config.backend == "ipc"
    assert WeightTransferTrainerFactory._registry["ipc"]() is IPCTrainerWeightTransferEngine


def test_our_sleep_tags_are_vllms():
    assert set(SLEEP_TAGS) == EXECUTOR_SLEEP_TAGS
    assert "level" in inspect.signature(Worker.sleep).parameters
    assert "tags" in inspect.signature(Worker.wake_up).parameters


def test_engine_sleep_and_wake_bind_and_reset_the_prefix_cache_with_the_kv_cache(spy_llm, tiny_policy_dir):
    _, llm = spy_llm
    engine = ve.VLLMEngine(str(tiny_policy_dir), seed=0)
    llm.reset_prefix_cache.reset_mock()
    engine.sleep(1)
    llm.sleep.assert_called_once_with(level=1)
    engine.wake_up(["weights"])
    llm.wake_up.assert_called_with(tags=["weights"])
    llm.reset_prefix_cache.assert_not_called()  # the KV cache is still asleep
    engine.wake_up(["kv_cache"])
    llm.wake_up.assert_called_with(tags=["kv_cache"])
    llm.reset_prefix_cache.assert_called_once_with()
    engine.wake_up()
    llm.wake_up.assert_called_with(tags=None)
    llm.wake_up.return_value = False
    with pytest.raises(RuntimeError, match="wake up"):
        engine.wake_up()


class _Executor:
    """The state vLLM's own `Executor.sleep` / `wake_up` keep; only the worker RPC is recorded."""
    is_sleeping = property(lambda self: bool(self.sleeping_tags))

    def __init__(self):
        self.sleeping_tags: set[str] = set()
        self.rpcs: list[tuple[str, dict]] = []

    def collective_rpc(self, method, kwargs=None, args=()):
        self.rpcs.append((method, kwargs))


@pytest.fixture()
def executor(spy_llm):
    """The spied LLM's sleep/wake_up run vLLM's real executor bookkeeping."""
    _, llm = spy_llm
    ex = _Executor()
    llm.sleep.side_effect = lambda level=1, mode="abort": Executor.sleep(ex, level)
    llm.wake_up.side_effect = lambda tags=None: Executor.wake_up(ex, tags) or not ex.sleeping_tags
    return ex


def test_vllm_ignores_a_wake_up_naming_a_tag_that_is_awake(executor):
    Executor.sleep(executor, 1)
    Executor.wake_up(executor, ["weights"])
    Executor.wake_up(executor, ["weights", "kv_cache"])  # why the generator names only what sleeps
    assert executor.sleeping_tags == {"kv_cache"}


def test_generator_sleeps_and_wakes_through_vllms_executor_and_never_loads_asleep(
        spy_llm, executor, tiny_policy_dir):
    _, llm = spy_llm
    g = RolloutGenerator(str(tiny_policy_dir), engine="vllm")
    g.sleep()
    g.sleep()  # a retried call: once
    assert g.asleep() == ["weights", "kv_cache"] and executor.sleeping_tags == EXECUTOR_SLEEP_TAGS
    g.wake_up(["weights"])
    g.call_engine("start_weight_update")  # a transport step: the weights are awake already
    g.set_weight_version(1)
    g.wake_up()
    assert executor.sleeping_tags == set() and g.asleep() == []
    assert executor.rpcs == [("sleep", {"level": 1}), ("wake_up", {"tags": ["weights"]}),
                             ("wake_up", {"tags": ["kv_cache"]})]
    # Asleep, a transport step wakes the weights, and a sample everything, by themselves.
    g.sleep()
    g.call_engine("start_weight_update")
    assert executor.sleeping_tags == {"kv_cache"}
    llm.generate.side_effect = _fake_generate
    g.generate([[5, 6]], ["p"], max_new_tokens=2, seed=1)
    assert executor.sleeping_tags == set()
    assert g.memory_events() == ["sleep", "wake weights", "load 1", "wake kv_cache",
                                 "sleep", "wake weights", "wake kv_cache", "sample"]
    with pytest.raises(ValueError, match="unknown sleep tags"):
        g.wake_up(["scheduling"])


def test_state_checksum_needs_all_workers_to_agree(spy_llm, tiny_policy_dir):
    _, llm = spy_llm
    engine = ve.VLLMEngine(str(tiny_policy_dir), seed=0)
    llm.collective_rpc.return_value = ["ab", "ab"]
    assert engine.state_checksum() == "ab"
    llm.collective_rpc.assert_called_with("instructray_received_checksum")
    llm.collective_rpc.return_value = ["ab", "ac"]
    with pytest.raises(RuntimeError, match="different"):
        engine.state_checksum()
    llm.collective_rpc.return_value = [None]
    with pytest.raises(RuntimeError, match="no weights"):
        engine.state_checksum()


# ---------------------------------------------------------------- receiving side, in the worker

class _LoaderModel(torch.nn.Module):
    """Stands in for a vLLM model: `load_weights` takes (HF name, tensor) pairs."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        for name, t in weights:
            params[name].data.copy_(t)
        return {n for n, _ in weights}


class _Worker(ve.ReceivedWeightsExtension):
    def __init__(self, model):
        self.model_runner = types.SimpleNamespace(get_model=lambda: model)


def _in_chunks(pairs, size):
    pairs = list(pairs)
    return [pairs[i: i + size] for i in range(0, len(pairs), size)]


def test_received_weights_checksum_equals_the_learners(tiny_models):
    learner, receiver = tiny_models
    source = ModuleSource(learner)
    assert [m.name for m in source.metadata] == [n for n, _ in learner.named_parameters()]
    worker = _Worker(_LoaderModel(receiver))
    worker.instructray_watch_loads()
    worker.instructray_watch_loads()  # idempotent: one wrapper, not two
    assert worker.instructray_received_checksum() is None
    model = worker.model_runner.get_model()
    for chunk in _in_chunks(source.iter_full(), 3):  # vLLM loads a packed bucket at a time
        model.load_weights(chunk)
    assert worker.instructray_received_checksum() == checksum(learner.named_parameters())
    assert checksum(receiver.named_parameters()) == checksum(learner.named_parameters())

    # The CPU path goes through the same loader; a corrupted tensor changes the checksum.
    bad = [(n, t.detach().clone()) for n, t in learner.named_parameters()]
    bad[0][1].view(-1)[0] += 1.0
    worker.instructray_load_weights(ve.to_wire(bad))
    assert worker.instructray_received_checksum() == checksum(bad)
    assert worker.instructray_received_checksum() != checksum(learner.named_parameters())


def test_cpu_path_tensors_survive_vllms_rpc_serialization():
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    g = torch.Generator().manual_seed(0)
    named = [("w", torch.randn(3, 4, generator=g)), ("b16", torch.randn(5, generator=g).to(torch.bfloat16)),
             ("t", torch.randn(4, 3, generator=g).t()), ("step", torch.tensor(7)),
             ("empty", torch.empty(0, 2, dtype=torch.float16))]
    # The message an engine-core client sends for collective_rpc(method, timeout, args, kwargs).
    msg = (0, 1, "collective_rpc", ("instructray_load_weights", None, (ve.to_wire(named),), None))
    raw_tensor = MsgpackDecoder().decode(MsgpackEncoder().encode((named[0][1],)))[0]
    assert not isinstance(raw_tensor, torch.Tensor)  # why to_wire exists
    (items,) = MsgpackDecoder().decode(MsgpackEncoder().encode(msg))[3][2]
    back = ve.from_wire(items)
    assert [n for n, _ in back] == [n for n, _ in named]
    assert checksum(back) == checksum(named)


# ---------------------------------------------------------------- trainer side

def test_trainer_init_infos_carry_each_rank_and_only_rank0_sends():
    for rank in (0, 1, 3):
        nccl = wt.trainer_init_info("nccl", world_sizes=[1, 2], rank=rank, master_address="10.0.0.1",
                                    master_port=29500)
        ipc = wt.trainer_init_info("ipc", world_sizes=[1], rank=rank)
        for info in (nccl, ipc):
            assert (info.rank, info.is_sender) == (rank, rank == 0)
        # every rank carries rank 0's rendezvous and the same NCCL world: trainer rank 0 + 3 workers
        assert (nccl.master_address, nccl.master_port, nccl.world_size) == ("10.0.0.1", 29500, 4)


class _Unreachable:
    """A generator handle no call may reach: what only the sender's engine may touch."""

    def __getattr__(self, name):
        raise AssertionError(f"a non-sender rank called generator.{name}")


def test_a_non_sender_rank_runs_vllms_real_engine_without_touching_the_generators(tiny_models):
    learner, _ = tiny_models
    # Not sharded (a DDP replica): the real NCCL engine of rank 1 needs no GPU, opens no
    # endpoint and only iterates the source; rank 0's checksum covers this copy.
    sender = wt.VLLMWeightSender(learner, [_Unreachable()], [1], "nccl", rank=1,
                                 master_address="10.0.0.1", master_port=29500)
    assert type(sender.engine) is NCCLTrainerWeightTransferEngine
    assert sender.engine.is_sender is False and sender.engine.model_update_group is None
    assert sender.send(3) is None and sender.client.version == 3
    sender.close()


def test_trainer_init_infos_construct():
    nccl = wt.trainer_init_info("nccl", world_sizes=[1, 2], master_address="10.0.0.1", master_port=29500,
                                packed_buffer_size_bytes=1 << 20)
    assert isinstance(nccl, NCCLTrainerInitInfo) and nccl.backend == "nccl"
    assert (nccl.world_size, nccl.rank, nccl.is_sender, nccl.packed) == (4, 0, True, True)
    assert nccl.packed_buffer_size_bytes == 1 << 20
    ipc = wt.trainer_init_info("ipc", world_sizes=[1], packed=False)
    assert isinstance(ipc, IPCTrainerInitInfo) and ipc.backend == "ipc" and ipc.is_sender
    with pytest.raises(ValueError):
        wt.trainer_init_info("nccl", world_sizes=[1])
    with pytest.raises(ValueError):
        wt.trainer_init_info("gloo", world_sizes=[1])


def test_each_generator_gets_its_own_nccl_ranks():
    sizes = [1, 2, 1]
    info = wt.trainer_init_info("nccl", world_sizes=sizes, master_address="10.0.0.1", master_port=29500)
    payload = NCCLTrainerWeightTransferEngine._build_worker_init_payload(info)
    ranks = []
    for size, d in zip(sizes, wt.per_generator_init_infos(payload, sizes)):
        parsed = NCCLWeightTransferInitInfo(**d)  # the worker side's own parse
        assert (parsed.world_size, parsed.master_port, parsed.packed) == (5, 29500, True)
        for r in range(size):  # an independent LLM: data-parallel index 0
            pc = types.SimpleNamespace(data_parallel_index=0, world_size=size, rank=r)
            ranks.append(_worker_group_rank(parsed.rank_offset, pc))
    assert sorted(ranks) == list(range(1, info.world_size))  # trainer is rank 0
    ipc = wt.per_generator_init_infos({"packed": False}, [1, 1])
    assert [IPCWeightTransferInitInfo(**d).packed for d in ipc] == [False, False]


def test_generator_client_is_a_weight_sync_client_for_the_real_trainer_calls():
    client = wt.GeneratorClient(["g0", "g1"], [1, 1])
    assert isinstance(client, VLLMWeightSyncClient)
    info = wt.trainer_init_info("nccl", world_sizes=[1, 1], master_address="h", master_port=1)
    # The calls vLLM's NCCL trainer engine makes on its client (nccl_engine.py).
    inspect.signature(client.init_weight_transfer_engine).bind(
        NCCLTrainerWeightTransferEngine._build_worker_init_payload(info))
    inspect.signature(client.start_weight_update).bind()
    inspect.signature(client.update_weights).bind(dataclasses.asdict(NCCLWeightTransferUpdateInfo()))
    inspect.signature(client.finish_weight_update).bind()
    for name in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                 "finish_weight_update"):
        assert list(inspect.signature(getattr(client, name)).parameters) == list(
            inspect.signature(getattr(VLLMWeightSyncClient, name)).parameters)[1:]
    # ... which land on the engine methods the generator forwards by name.
    for name in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                 "finish_weight_update", "transfer_world_size"):
        assert callable(getattr(ve.VLLMEngine, name))


def test_sender_calls_the_real_trainer_factory_and_returns_the_learner_checksum(monkeypatch, tiny_models):
    learner, _ = tiny_models
    real = WeightTransferTrainerFactory.trainer_init
    spy = create_autospec(real)
    spy.return_value = create_autospec(NCCLTrainerWeightTransferEngine, instance=True)
    monkeypatch.setattr(WeightTransferTrainerFactory, "trainer_init", spy)
    sender = wt.VLLMWeightSender(learner, ["g0", "g1"], [1, 2], "nccl",
                                 master_address="10.0.0.1", master_port=29500)
    (info,), kw = spy.call_args.args, spy.call_args.kwargs
    inspect.signature(real).bind(info, **kw)
    assert isinstance(info, NCCLTrainerInitInfo) and info.world_size == 4
    assert (info.rank, info.is_sender) == (0, True)
    assert isinstance(kw["client"], wt.GeneratorClient) and isinstance(kw["source"], ModuleSource)
    assert [m.name for m in kw["source"].metadata] == [n for n, _ in learner.named_parameters()]
    digest = sender.send(7)
    spy.return_value.send_weights.assert_called_once_with()
    assert sender.client.version == 7
    assert digest == checksum(learner.named_parameters())
    sender.close()
    spy.return_value.shutdown.assert_called_once_with()
    inspect.signature(NCCLTrainerWeightTransferEngine.trainer_init).bind(info, client=kw["client"],
                                                                       source=kw["source"])


def test_rank_offsets():
    assert wt.rank_offsets([1, 2, 4]) == [1, 2, 4]
    assert wt.rank_offsets([2, 2]) == [1, 3]
    assert wt.rank_offsets([]) == []


# ---------------------------------------------------------------- an fsdp learner group feeding vLLM

# Real 2-rank PolicyLearner groups on gloo (FSDP2 shards, through rlhf.sharding.prepare, as in a
# run), driven by our real driver code; vLLM's GPU-only pieces are spies: rank 0's NCCL engine
# (its communicator needs CUDA) and the generator's `LLM`. The other ranks run vLLM's real engine.

@pytest.fixture(scope="module")
def ray_cpus():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def fsdp_learners(ray_cpus, tiny_policy_dir):
    from actors import PolicyLearner, WorkerGroup
    from rlhf.sharding import TrainLayout

    group = WorkerGroup(PolicyLearner, 2, str(tiny_policy_dir), num_cpus=0.5, layout=TrainLayout("fsdp"),
                        device="cpu", num_threads=1)
    group.wait_ready()
    yield group
    group.shutdown()


def _unsharded(tiny_policy_dir) -> torch.nn.Module:
    from rlhf.models import load_policy

    return load_policy(str(tiny_policy_dir), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank missing from a gather hangs the others
def test_module_source_over_fsdp_shards_declares_and_gathers_whole_tensors_on_every_rank(
        fsdp_learners, tiny_policy_dir):
    from vllm.distributed.weight_transfer.base import Shard

    def view(learner):  # nested: pickled by value; runs on both ranks at once (iter_full gathers)
        from vllm.distributed.weight_transfer import ModuleSource
        from rlhf.sharding import local

        source = ModuleSource(learner.model)
        meta = [(m.name, m.dtype, m.shape, m.owners, m.placements) for m in source.metadata]
        return (meta, {n: t.clone() for n, t in source.iter_full()},
                {n: tuple(local(p).shape) for n, p in learner.model.named_parameters()})

    plain = dict(_unsharded(tiny_policy_dir).named_parameters())
    (meta0, full0, local0), (meta1, full1, local1) = ray.get(
        [w.__ray_call__.remote(view) for w in fsdp_learners.workers])
    # the whole model, declared identically on both ranks, each tensor owned by both, split on dim 0
    assert meta0 == meta1 == [(n, p.dtype, tuple(p.shape), (0, 1), (Shard(0),)) for n, p in plain.items()]
    for name, p in plain.items():
        assert local0[name][0] + local1[name][0] == p.shape[0] and local0[name][0] < p.shape[0], name
    # ... and what a rank iterates (the sender's broadcast, another rank's part in the gathers)
    # is every whole tensor, bit for bit the unsharded model's
    for full in (full0, full1):
        assert list(full) == list(plain)
        assert all(torch.equal(full[n], p.detach()) for n, p in plain.items())


def _spied_generator_class(received: str):
    from actors.generator import RolloutGenerator

    class SpiedGenerator(RolloutGenerator):
        """Our generator over `create_autospec(LLM)`, which reports `received` as the workers'
        checksum (rank 0's engine is a spy: no weights travel)."""

        def __init__(self, *args, **kwargs):
            import vllm as v
            from unittest.mock import create_autospec as spec

            cls = spec(v.LLM)
            cls.return_value.get_world_size.return_value = 1
            cls.return_value.collective_rpc.return_value = [received]
            v.LLM = cls
            super().__init__(*args, **kwargs)

        def llm_calls(self):
            return [c[0] for c in self.engine.llm.method_calls]
    return SpiedGenerator


def _rank0_engine_spy():
    """What to run in a learner process (nested: pickled by value): vLLM's trainer factory
    spied; rank 0's NCCL engine (GPU only) an autospec whose send_weights iterates the source
    as the real sender does, every other rank's engine vLLM's real one."""
    def install(learner) -> None:
        from unittest.mock import create_autospec as spec

        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory as factory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine as nccl

        real = factory.trainer_init

        def trainer_init(info, *, client, source=None):
            if not info.is_sender:
                return real(info, client=client, source=source)
            engine = spec(nccl, instance=True)
            engine.send_weights.side_effect = lambda: list(nccl._checked_iter(source, source.metadata))
            return engine
        factory.trainer_init = spec(real, side_effect=trainer_init)
    return install


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank left out of the sync hangs the others in a gather
def test_vllm_sync_attaches_and_sends_on_every_rank_and_verifies_the_gathered_checksum(
        fsdp_learners, tiny_policy_dir):
    from actors.resources import actor_class
    from orchestration.ppo.weight_sync import VLLMSync

    whole = checksum(_unsharded(tiny_policy_dir).named_parameters())
    generator = actor_class(_spied_generator_class(whole), 0.25, 0.0).remote(str(tiny_policy_dir), engine="vllm")
    workers = fsdp_learners.workers
    ray.get([w.__ray_call__.remote(_rank0_engine_spy()) for w in workers])

    sync = VLLMSync(fsdp_learners, [generator], "nccl")

    def attached(learner):
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory as factory
        (info,), kw = factory.trainer_init.call_args
        sender = learner._vllm_weight_sender
        return (sender.rank, info.rank, info.is_sender, info.master_address, info.master_port,
                info.world_size, kw["source"].metadata[0].owners)
    first, second = ray.get([w.__ray_call__.remote(attached) for w in workers])
    assert first[:3] == (0, 0, True) and second[:3] == (1, 1, False)
    address, port = first[3:5]
    assert second[3:] == first[3:] == (address, port, 2, (0, 1))  # rank 0's rendezvous, for all

    ray.get(fsdp_learners.call_all("end_iteration"))  # version 1; the weights are still the policy's
    assert sync.sync() == {"synced_version": 1, "synced_generators": 1, "synced_checksum": whole}
    assert ray.get(generator.weight_version.remote()) == 1
    sends = ray.get(workers[0].__ray_call__.remote(lambda lr: lr._vllm_weight_sender.engine.send_weights.call_count))
    assert sends == 1
    assert "get_world_size" in ray.get(generator.llm_calls.remote())
