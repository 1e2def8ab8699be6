"""KVStacksConnector when vLLM preempts requests and when a request is aborted in the step that loads it.

One small engine for the module: 13 KV blocks of 128 tokens (``num_gpu_blocks_override``),
prefix caching off (only the stack can serve a prompt again), vLLM's stats on (its
preemption counter and KV cache usage), a CPU tier of 64-token chunks reporting to a real
controller (its ``in_use`` count says whether a load still holds chunks). Prompts are short:
every cold token costs prefill time, and preemption needs only blocks to run out.
"""

from __future__ import annotations

import time

import pytest

# The first test also pays for the engine's start (minutes on a loaded machine).
pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(900)]

INSTANCE = "vllm-preempt"
BLOCKS = 13  # six 250-token prompts fill 12 blocks: when each needs its third, most are preempted
PROMPT = 250
NEW_TOKENS = 16  # 250 + 16 > 2 * 128: every request needs a third block while decoding
CHUNK = 64  # a prompt stores 249 tokens: three whole chunks, which a resumed request loads again


@pytest.fixture(scope="module")
def small_llm(vllm_model, controller, monkeypatch_module):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    monkeypatch_module.setenv("KVSTACKS_WORKER_TOKEN", controller.worker_token)
    stack = {
        "chunk_size": CHUNK,
        "stack": [{"backend": "cpu", "capacity": "256MiB"}],
        "controller": {"url": controller.url, "instance_id": INSTANCE, "heartbeat_interval": 0.3,
                       "flush_interval": 0.01},
    }
    ktc = KVTransferConfig(kv_connector="KVStacksConnector", kv_connector_module_path="kvstacks_vllm.connector",
                           kv_role="kv_both", kv_connector_extra_config={"stack": stack})
    # vLLM wants room for one request of max_model_len with a block to spare.
    engine = LLM(model=vllm_model, dtype="bfloat16", max_model_len=(BLOCKS - 1) * 128, enforce_eager=True, seed=0,
                 enable_prefix_caching=False, num_gpu_blocks_override=BLOCKS, disable_log_stats=False,
                 kv_transfer_config=ktc)
    engine.generate([{"prompt_token_ids": list(range(100, 400))}], sampling(1), use_tqdm=False)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def sampling(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)


def generate(llm, prompts: list[list[int]], max_tokens: int = NEW_TOKENS):
    """Per prompt: (tokens loaded, generated token ids, top-5 logprobs per position)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling(max_tokens), use_tqdm=False)
    return [answer(o) for o in outs]


def answer(out) -> tuple[int, list[int], list[dict[int, float]]]:
    """(tokens loaded, generated token ids, top-5 logprobs per position) of a ``RequestOutput``."""
    completion = out.outputs[0]
    return (out.num_cached_tokens or 0, list(completion.token_ids),
            [{t: lp.logprob for t, lp in pos.items()} for pos in completion.logprobs])


def metric(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def assert_same_answer(got, want) -> None:
    """The same greedy tokens, or the same up to a close call that bf16 numerics may flip.

    A load into the wrong blocks, or KV left from another request, changes the tokens from the
    first one on; a different split of loaded and computed tokens moves logits by a rounding
    step, which can flip two nearly tied candidates (each then ranks the other's token high).
    """
    _, got_tokens, got_lps = got
    _, want_tokens, want_lps = want
    for i, (g, w) in enumerate(zip(got_tokens, want_tokens)):
        if g == w:
            continue
        assert g in want_lps[i] and w in got_lps[i], f"token {i}: {g} vs {w}, not a close call"
        assert abs(want_lps[i][w] - want_lps[i][g]) < 0.5, f"token {i}: {g} vs {w}, not a close call"
        return  # the continuations differ from here on
    assert len(got_tokens) == len(want_tokens)


def worker_stats(controller) -> dict:
    r = controller.post("/query_worker_info", {"instance_id": INSTANCE})
    assert r.status_code == 200, r.text
    (info,) = r.json()["worker_infos"]
    return info["stats"] or {}


def settled_stats(controller, hits_at_least: int = 0) -> dict:
    """The worker's tier stats once a heartbeat reported every load done."""
    def done():
        cpu = worker_stats(controller).get("cpu")
        return cpu if cpu and cpu["in_use"] == 0 and cpu["hits"] >= hits_at_least else None

    return controller.wait(done, "the worker's stats with no chunk in use", timeout=30)


def test_preempted_requests_reload_from_the_stack_and_answer_the_same(small_llm, documents, controller):
    llm = small_llm
    prompts = documents(llm.get_tokenizer(), 6, PROMPT, offset=50)
    # One at a time, nothing is preempted: each prompt is computed cold and stored.
    alone = [generate(llm, [p])[0] for p in prompts]
    assert [hit for hit, _, _ in alone] == [0] * 6
    preempted_before = metric(llm, "vllm:num_preemptions")
    assert preempted_before == 0
    # Together they outgrow the 13 blocks while decoding: vLLM preempts, frees the
    # preempted requests' blocks, and later resumes them in new blocks, where the connector
    # loads their prompts' whole chunks again (their tokens now include generated ones).
    together = generate(llm, prompts)
    preempted = metric(llm, "vllm:num_preemptions") - preempted_before
    print(f"preemptions: {preempted:.0f}")
    assert preempted >= 2
    assert [hit for hit, _, _ in together] == [PROMPT - 1] * 6  # first schedule: loaded whole
    for got, want in zip(together, alone):
        assert_same_answer(got, want)
    # Nothing held: no KV block of vLLM's (prefix caching off, so freed means free), no chunk in use.
    assert metric(llm, "vllm:kv_cache_usage_perc") == 0
    settled_stats(controller)
    # The lookup socket still answers: the prompts come back warm, with the same answers.
    again = generate(llm, prompts[:2])
    assert [hit for hit, _, _ in again] == [PROMPT - 1] * 2
    for got, want in zip(again, alone):
        assert_same_answer(got, want)


def test_a_request_aborted_in_the_step_that_loads_it(small_llm, documents, controller):
    """The abort reaches the engine core while the worker runs the step holding the load.

    Step 1 computes a cold 600-token prompt (a second or more). The warm prompt and a cold
    500-token one arrive meanwhile, so step 2 loads the first and computes the second (a
    second or more again); the abort is sent the moment step 1's output arrives, so it
    lands in step 2. The load must finish or fail whole, the aborted request's blocks and chunks be
    let go, and the next requests be answered right.
    """
    llm = small_llm
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    (warm,) = documents(tokenizer, 1, PROMPT, offset=60)
    first, second = documents(tokenizer, 2, 600, offset=70)
    second = second[:500]
    (reference,) = generate(llm, [warm], 1)  # cold; stores the prompt
    hits_before = settled_stats(controller)["hits"]

    engine.add_request("first", {"prompt_token_ids": first}, sampling(1))
    time.sleep(0.3)  # step 1 has started with "first" alone
    engine.add_request("aborted", {"prompt_token_ids": warm}, sampling(NEW_TOKENS))
    engine.add_request("second", {"prompt_token_ids": second}, sampling(1))
    finished: dict[str, object] = {}
    aborted = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
            if out.request_id == "first" and out.finished and not aborted:
                engine.abort_request(["aborted"])
                aborted = True
    assert aborted and set(finished) >= {"first", "second"}
    assert "aborted" not in finished or finished["aborted"].outputs[0].finish_reason == "abort"
    # The aborted request's load ran (its four chunks were read) before the abort took it away.
    stats = settled_stats(controller, hits_before + 4)
    assert stats["hits"] == hits_before + 4, stats
    assert metric(llm, "vllm:kv_cache_usage_perc") == 0
    # Nothing wedged, nothing left behind: the aborted prompt and the two others come back warm.
    got = generate(llm, [warm, first, second], 1)
    assert [hit for hit, _, _ in got] == [PROMPT - 1, 599, 499]
    assert_same_answer(got[0], reference)
    assert_same_answer(got[1], answer(finished["first"]))
    assert_same_answer(got[2], answer(finished["second"]))
