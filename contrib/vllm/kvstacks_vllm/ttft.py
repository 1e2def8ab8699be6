"""Time to first token in real vLLM, one system per fresh process (``benchmarks/vllm_ttft.py``, the demo).

Systems (each its own ``vllm.LLM``, started in its own process):

  cold                 no cache: prefix caching off, no connector; every prompt computed whole
  prefix-cache         vLLM's own prefix cache (the same prompt again, same process)
  native-offload       vLLM's OffloadingConnector (or $KVSTACKS_NATIVE_OFFLOAD), its copies done by
                       kvstacks_vllm.cpu_offload_shim on CPU; it needs prefix caching on, so the prefix
                       cache is reset before each warm run and only the CPU copy can serve
  kvstacks-cpu         KVStacksConnector, prefix caching off: the CPU tier (over a disk tier)
  kvstacks-disk        a new process on the same disk folder: warm from disk after a restart

A run is one ``generate`` with ``max_tokens=1``: prefill plus one sampled token, timed
from the caller (vLLM's IPC included, the same for every system).

    python -m kvstacks_vllm.ttft SYSTEM '{"model": ..., "disk": ..., "tokens": 2000, ...}'

prints one JSON line: the system's medians and hit counts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("cold", "prefix-cache", "native-offload", "kvstacks-cpu", "kvstacks-disk")
#: Systems a multi-turn chat runs on (a restarted process has no conversation history to reuse).
CHAT_SYSTEMS = ("cold", "prefix-cache", "native-offload", "kvstacks-cpu")
ANSWER = "Thank you. Based on the manual, the operator first checks the zone's sensor log, then the valves."


def stack(disk: str) -> dict[str, Any]:
    return {"chunk_size": 256, "stack": [{"backend": "cpu", "capacity": "1GiB"},
                                         {"backend": "disk", "path": disk, "capacity": "8GiB"}]}


def make_llm(system: str, model: str, disk: str) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = None
    prefix = system in ("prefix-cache", "native-offload")
    if system == "native-offload":
        ktc = KVTransferConfig(kv_connector=os.environ.get("KVSTACKS_NATIVE_OFFLOAD", "OffloadingConnector"),
                               kv_role="kv_both", kv_connector_extra_config=native_offload_config())
    elif system.startswith("kvstacks"):
        ktc = KVTransferConfig(kv_connector="KVStacksConnector", kv_connector_module_path="kvstacks_vllm.connector",
                               kv_role="kv_both", kv_connector_extra_config={"stack": stack(disk)})
    return LLM(model=model, dtype="bfloat16", max_model_len=4096, enforce_eager=True, seed=0,
               enable_prefix_caching=prefix, kv_transfer_config=ktc)


def native_offload_config() -> dict[str, Any]:
    """vLLM's OffloadingConnector with 1 GiB of CPU memory, its copies done by ``kvstacks_vllm.cpu_offload_shim``.

    vLLM's own CPU offloading worker refuses the CPU platform (docs/vllm.md has the errors);
    ``KVSTACKS_NATIVE_OFFLOAD_SPEC=vllm`` asks for it anyway, to see whether a vLLM release runs it.
    """
    config: dict[str, Any] = {"cpu_bytes_to_use": 1 << 30}
    if os.environ.get("KVSTACKS_NATIVE_OFFLOAD_SPEC") != "vllm":
        config.update(spec_name="SyncCPUOffloadingSpec", spec_module_path="kvstacks_vllm.cpu_offload_shim")
    return config


def prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens sharing no prefix (a different first line each)."""
    from kvstacks_transformers.long_text import prompt_ids

    out = []
    for i in range(count):
        head = tokenizer.encode(f"{5000 + i} archive record\n", add_special_tokens=False)
        out.append(head + prompt_ids(tokenizer, length - len(head)))
    return out


def conversations(tokenizer: Any, count: int, turns: int, document_tokens: int) -> list[list[list[int]]]:
    """Per conversation, the prompt of each turn: a document, then questions and fixed answers.

    Fixed answers keep the workload the same for every system (and need no decoding).
    """
    from kvstacks_transformers.long_text import document_ids

    chats = []
    for c in range(count):
        document = tokenizer.decode(document_ids(tokenizer, document_tokens))
        messages = [{"role": "user", "content": f"Conversation {c}. Read this manual.\n\n{document}\n\nWhat is it about?"}]
        turn_prompts = []
        for t in range(turns):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            turn_prompts.append(tokenizer.encode(text, add_special_tokens=False))
            messages = messages + [{"role": "assistant", "content": ANSWER},
                                   {"role": "user", "content": f"Question {t + 1}: what does part {t + 2} say?"}]
        chats.append(turn_prompts)
    return chats


def timed(llm: Any, prompt: list[int]) -> tuple[float, int, int]:
    from vllm import SamplingParams

    started = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return time.perf_counter() - started, out.num_cached_tokens or 0, out.outputs[0].token_ids[0]


def measure(system: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Start ``system``'s engine and time its runs; see the module's docstring."""
    started = time.perf_counter()
    llm = make_llm(system, spec["model"], spec["disk"])
    start_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    timed(llm, list(range(200, 500)))  # one-time setup, charged to nobody
    docs = prompts(tokenizer, spec["repeats"], spec["tokens"])
    result: dict[str, Any] = {"system": system, "engine_start_s": start_s}
    if system != "kvstacks-disk":
        first = [timed(llm, p) for p in docs]
        result["first_s"] = statistics.median(t for t, _, _ in first)
        result["first_tokens"] = [tok for _, _, tok in first]
    if system == "native-offload":
        time.sleep(1.0)  # its copies to CPU finish behind the requests
    if system != "cold":
        again = []
        for p in docs:
            if system == "native-offload":
                llm.reset_prefix_cache()
            again.append(timed(llm, p))
        result["warm_s"] = statistics.median(t for t, _, _ in again)
        result["warm_hits"] = [hit for _, hit, _ in again]
        result["warm_tokens"] = [tok for _, _, tok in again]
    if spec.get("turns") and system in CHAT_SYSTEMS:
        total, per_turn = 0.0, []
        for chat in conversations(tokenizer, spec["conversations"], spec["turns"], spec["chat_document_tokens"]):
            for p in chat:
                if system == "native-offload":
                    llm.reset_prefix_cache()
                t, hit, _ = timed(llm, p)
                total += t
                per_turn.append((len(p), hit, t))
        result["chat_prefill_s"] = total
        result["chat_turns"] = per_turn
    if system == "kvstacks-cpu":
        time.sleep(2.0)  # the disk copies, written behind the CPU tier, for the restart row
    return result


def run_in_process(system: str, spec: dict[str, Any], log: Path | None = None) -> dict[str, Any]:
    """``measure`` in a fresh Python process (a new vLLM engine, nothing inherited)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; with 1 GiB of CPU tier, a worker stays near 3 GB
    out = subprocess.run([sys.executable, "-m", "kvstacks_vllm.ttft", system, json.dumps(spec)],
                         env=env, stdout=subprocess.PIPE, stderr=open(log, "ab") if log else subprocess.DEVNULL,
                         text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system}: the measuring process failed (exit {out.returncode})"
                           + (f"; see {log}" if log else ""))
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
