"""The vLLM backend without vLLM or a GPU: the request building is checked directly, and the
engine is a stand-in `vllm` module (put into sys.modules) that records what it is given."""
import re
import subprocess
import sys
import types

import pytest

from ..conftest import engine_config

from builder.backends import hf_chat, make_backend
from builder.backends.base import Request
from builder.backends.vllm import INSTALL_HINT, build_batch, sampling_kwargs, structured_kwargs
from builder.models import ModelNotFound

from .test_transformers_backend import INJECTION, SMALL_SCHEMA

ASK = ({"role": "system", "content": "Annotate."}, {"role": "user", "content": INJECTION})


class Params:
    """SamplingParams / StructuredOutputsParams / GuidedDecodingParams stand-in."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    instances: list = []
    fail = False

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        return [types.SimpleNamespace(
            prompt_token_ids=prompt["prompt_token_ids"],
            outputs=[types.SimpleNamespace(text=f"answer {n}", token_ids=[7] * (n + 1),
                                           finish_reason="length" if params.kwargs["max_tokens"] == 3 else "stop")])
            for n, (prompt, params) in enumerate(zip(prompts, sampling_params))]


def fake_vllm(monkeypatch, old_api: bool = False):
    vllm = types.ModuleType("vllm")
    params = types.ModuleType("vllm.sampling_params")
    inputs = types.ModuleType("vllm.inputs")
    vllm.LLM, vllm.SamplingParams = FakeLLM, Params
    if old_api:
        params.GuidedDecodingParams = Params
    else:
        params.StructuredOutputsParams = Params
    inputs.TokensPrompt = dict  # a TypedDict in vLLM: calling it makes a dict
    vllm.sampling_params, vllm.inputs = params, inputs
    for name, module in (("vllm", vllm), ("vllm.sampling_params", params), ("vllm.inputs", inputs)):
        monkeypatch.setitem(sys.modules, name, module)
    FakeLLM.instances, FakeLLM.fail = [], False
    return vllm


def test_importing_the_module_does_not_import_vllm():
    code = "import sys, builder.backends.vllm; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_vllm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ModelNotFound, match=re.escape(INSTALL_HINT)):
        make_backend(engine_config(backend="vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct"))


def test_sampling_kwargs_carry_sampling_seed_and_budget():
    request = Request(messages=ASK, max_tokens=99, temperature=0.7, top_p=0.9, repeat_penalty=1.1, seed=42)
    assert sampling_kwargs(request) == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1,
                                        "max_tokens": 99, "seed": 42}
    assert sampling_kwargs(Request(messages=ASK, temperature=0))["temperature"] == 0  # greedy in vLLM


def test_structured_kwargs_current_and_old_api(monkeypatch):
    assert structured_kwargs(None, fake_vllm(monkeypatch)) == {}
    current = structured_kwargs(SMALL_SCHEMA, fake_vllm(monkeypatch))
    assert current["structured_outputs"].kwargs == {"json": SMALL_SCHEMA, "disable_any_whitespace": True}
    old = structured_kwargs(SMALL_SCHEMA, fake_vllm(monkeypatch, old_api=True))
    assert old["guided_decoding"].kwargs == {"json": SMALL_SCHEMA}


def test_build_batch_token_ids_and_params(monkeypatch, hf_tokenizer):
    vllm = fake_vllm(monkeypatch)
    requests = [Request(messages=ASK, schema=SMALL_SCHEMA, max_tokens=50, seed=5),
                Request(messages=ASK, max_tokens=2000, seed=6),  # prompt + 2000 > n_ctx
                Request(messages=({"role": "user"},)),  # no content
                Request(messages=ASK, max_tokens=20, temperature=0, seed=7)]
    prompts, params, slots, responses = build_batch(requests, hf_tokenizer, 1024, vllm)
    assert slots == [0, 3] and len(prompts) == len(params) == 2
    ids = prompts[0]["prompt_token_ids"]
    assert ids == hf_chat.prompt_ids(hf_tokenizer, ASK)
    start, end = hf_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 2  # the passage's <|im_end|> stayed text
    assert not hf_chat.special_ids(hf_tokenizer) & set(hf_chat.content_ids(hf_tokenizer, INJECTION))
    assert params[0].kwargs["structured_outputs"].kwargs["json"] == SMALL_SCHEMA
    assert params[0].kwargs["seed"] == 5 and params[0].kwargs["max_tokens"] == 50
    assert "structured_outputs" not in params[1].kwargs and params[1].kwargs["temperature"] == 0
    assert responses[0] is None and responses[3] is None
    assert responses[1].finish_reason == "error" and "n_ctx=1024" in responses[1].error
    assert responses[2].finish_reason == "error" and "KeyError" in responses[2].error


def test_whole_batch_goes_in_one_generate_call(monkeypatch, hf_smollm2):
    fake_vllm(monkeypatch)
    cfg = engine_config(backend="vllm", model=str(hf_smollm2), n_ctx=1024, dtype="bfloat16",
                      gpu_memory_utilization=0.5, tensor_parallel_size=2, enable_prefix_caching=True, kv_cache_gib=1.5)
    backend = make_backend(cfg)
    # keying and counting need no engine: a Ray driver never loads the model
    assert backend.kind == "vllm" and backend.family == "llama" and len(backend.model_id) == 64
    assert backend.count_tokens("a few words") > 0 and backend.describe()["sha256"] == backend.model_id
    assert FakeLLM.instances == []
    requests = [Request(messages=ASK, schema=SMALL_SCHEMA, max_tokens=40, seed=i) for i in range(3)]
    requests.insert(1, Request(messages=ASK, max_tokens=5000))  # too long: answered without vLLM
    requests.append(Request(messages=ASK, max_tokens=3))
    seen = []
    responses = backend.generate(requests, on_response=lambda i, r: seen.append((i, r.finish_reason)))
    (llm,) = FakeLLM.instances  # made by the first call
    assert llm.kwargs == {"model": str(hf_smollm2), "enable_prefix_caching": True, "gpu_memory_utilization": 0.5,
                          "tensor_parallel_size": 2, "dtype": "bfloat16", "max_model_len": 1024, "seed": 0,
                          "enforce_eager": False, "kv_cache_memory_bytes": 3 * 2**29}
    assert len(llm.calls) == 1
    prompts, params = llm.calls[0]
    assert len(prompts) == len(params) == 4
    assert [p.kwargs["seed"] for p in params] == [0, 1, 2, 0]
    assert seen == [(0, "stop"), (1, "error"), (2, "stop"), (3, "stop"), (4, "length")]
    assert [r.text for r in responses] == ["answer 0", "", "answer 1", "answer 2", "answer 3"]
    assert responses[2].completion_tokens == 2 and responses[2].prompt_tokens == len(prompts[0]["prompt_token_ids"])
    assert backend.render(ASK) == backend.tokenizer.apply_chat_template(list(ASK), tokenize=False,
                                                                        add_generation_prompt=True)


def test_a_failing_batch_gives_error_responses(monkeypatch, hf_smollm2):
    fake_vllm(monkeypatch)
    backend = make_backend(engine_config(backend="vllm", model=str(hf_smollm2), n_ctx=1024))
    FakeLLM.fail = True
    responses = backend.generate([Request(messages=ASK, max_tokens=8), Request(messages=ASK, max_tokens=8)])
    assert [r.finish_reason for r in responses] == ["error", "error"]
    assert "CUDA out of memory" in responses[0].error


def test_a_decision_is_read_from_vllms_logprobs_and_probes_a_shared_prefix():
    """vLLM returns the top-K of each generated token as {id: Logprob}; "re" (begins revise and
    reject) off the generated path is followed with a one-token probe."""
    import math

    from builder.backends.vllm import to_response

    lp = lambda text, p: types.SimpleNamespace(decoded_token=text, logprob=math.log(p))  # noqa: E731
    tokens = [(1, '{"verdict": "', {1: lp('{"verdict": "', 1.0)}), (2, "surv", {2: lp("surv", 0.5), 3: lp("re", 0.5)}),
              (4, "ives", {4: lp("ives", 1.0)}), (5, '"}', {5: lp('"}', 1.0)})]
    output = types.SimpleNamespace(prompt_token_ids=[9, 9], outputs=[types.SimpleNamespace(
        text='{"verdict": "survives"}', token_ids=[t for t, _, _ in tokens], logprobs=[top for _, _, top in tokens],
        finish_reason="stop")])
    probed = []

    def probe(ids):
        probed.append(ids)
        return {6: ("vise", math.log(0.2)), 7: ("ject", math.log(0.8))}

    request = Request(ASK, decision=("verdict", ("survives", "revise", "reject")))
    r = to_response(output, 0.1, request, probe)
    probs = {k: math.exp(v) for k, v in r.decision["logprobs"].items()}
    assert probs == pytest.approx({"survives": 0.5, "revise": 0.1, "reject": 0.4})
    assert probed == [[9, 9, 1, 3]]  # the prompt, the tokens before the value, and "re"
    assert sampling_kwargs(request)["logprobs"] == 20 and "logprobs" not in sampling_kwargs(Request(ASK))
