"""Client side of engines/pd_cpu_recipe.sh: greedy requests, output comparison, decode-side evidence.

Standard library + prometheus_client + psutil, so it runs with the engine venv's python (or the project's).
  query URL OUT.json            the fixed request set (3 completions, 1 streamed, 1 chat) against URL
  compare REF.json PD.json      PASS/FAIL: PD outputs equal the aggregated ones, token for token
  evidence PREFILL DECODE N CONNECTOR
                                PASS/FAIL: decode got its prompt KV by transfer, prefill made 1 token each
  idle-cpu SECONDS PID...       PASS/FAIL: the process trees of PID... stay under half a core while idle
Exit status 1 on any FAIL.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-llama"
MAX_TOKENS = 16
# Each prompt is 80-130 tokens of the tiny model's tokenizer: several whole 32-token blocks, since
# ExampleConnector stores whole blocks only (and NIXL moves whole blocks), plus a partial tail.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light, " * 2,
    "In a distant galaxy far away, a small robot named Pixel dreamed of painting the stars with colors " * 2,
    "Prefill and decode disaggregation moves the key value cache from one server to another over the network " * 2,
]
CHAT = "Explain in one sentence why a decode server should not recompute the prompt it was handed. " * 2


def _post(url: str, body: dict) -> urllib.request.addinfourl:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def _completion(url: str, prompt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}
    out = json.load(_post(f"{url}/v1/completions", body))
    choice = out["choices"][0]
    return {"kind": "completion", "prompt_tokens": out["usage"]["prompt_tokens"], "text": choice["text"],
            "token_ids": choice.get("token_ids")}


def _streamed(url: str, prompt: str) -> dict:
    # Server-sent events through the router: the concatenated deltas must equal the one-shot text.
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text, chunks = [], 0
    with _post(f"{url}/v1/completions", body) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                text.append(event["choices"][0].get("text") or "")
                chunks += 1
    return {"kind": "stream", "text": "".join(text), "chunks": chunks}


def _chat(url: str, content: str) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    out = json.load(_post(f"{url}/v1/chat/completions", body))
    return {"kind": "chat", "prompt_tokens": out["usage"]["prompt_tokens"],
            "text": out["choices"][0]["message"]["content"]}


def query(url: str, out_path: str) -> int:
    results = [_completion(url, p) for p in PROMPTS] + [_streamed(url, PROMPTS[0]), _chat(url, CHAT)]
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        print(f"  {r['kind']:<10} {r.get('prompt_tokens', '-'):>4} prompt tokens -> {r['text']!r}")
    return 0


def compare(ref_path: str, pd_path: str) -> int:
    ref, pd = (json.load(open(p)) for p in (ref_path, pd_path))
    same = [a["text"] == b["text"] and a.get("token_ids") == b.get("token_ids") for a, b in zip(ref, pd)]
    ok = len(ref) == len(pd) and all(same)
    print(f"{'PASS' if ok else 'FAIL'} outputs: {sum(same)}/{len(ref)} greedy results equal "
          f"(aggregated vs PD; 3 completions with token ids, 1 streamed, 1 chat)")
    for i, s in enumerate(same):
        if not s:
            print(f"  differ #{i} {ref[i]['kind']}: agg={ref[i]['text']!r} pd={pd[i]['text']!r}")
    return 0 if ok else 1


def _metrics(url: str) -> dict[tuple[str, str], float]:
    """(sample name, value of its 'source' label or '') -> value, summed over engines."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, s.labels.get("source", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def evidence(prefill_url: str, decode_url: str, n_requests: int, connector: str) -> int:
    p, d = _metrics(prefill_url), _metrics(decode_url)
    by_src = {src: d.get(("vllm:prompt_tokens_by_source_total", src), 0.0)
              for src in ("external_kv_transfer", "local_compute", "local_cache_hit")}
    prompt = d.get(("vllm:prompt_tokens_total", ""), 0.0)
    ext = by_src["external_kv_transfer"]
    # NIXL hands over every prompt token; ExampleConnector only whole blocks below len-1 (~75% here).
    ok_ext = prompt > 0 and ext >= 0.5 * prompt and by_src["local_compute"] < ext
    checks = [(ok_ext, f"transfer: decode prompt tokens {prompt:.0f} = external_kv_transfer {ext:.0f} + "
                       f"local_compute {by_src['local_compute']:.0f} + local_cache_hit "
                       f"{by_src['local_cache_hit']:.0f} (vllm:prompt_tokens_by_source_total)")]
    gen = p.get(("vllm:generation_tokens_total", ""), 0.0)
    checks.append((gen == n_requests, f"prefill-only: prefill generated {gen:.0f} tokens for {n_requests} "
                                      f"requests (router sends max_tokens=1; vllm:generation_tokens_total)"))
    if connector == "nixl":
        xfers = d.get(("vllm:nixl_xfer_time_seconds_count", ""), 0.0)
        nbytes = d.get(("vllm:nixl_bytes_transferred_sum", ""), 0.0)
        failed = d.get(("vllm:nixl_num_failed_transfers_total", ""), 0.0)
        # A prefill whose lease (30 s) ran out before decode read the blocks: the 2-core stall symptom.
        expired = sum(m.get(("vllm:nixl_num_kv_expired_reqs_total", ""), 0.0) for m in (p, d))
        secs = d.get(("vllm:nixl_xfer_time_seconds_sum", ""), 0.0)
        checks.append((xfers >= len(PROMPTS) and nbytes > 0 and failed == 0 and expired == 0,
                       f"nixl: {xfers:.0f} transfers, {nbytes:.0f} bytes in {secs * 1e3:.1f} ms, "
                       f"{failed:.0f} failed, {expired:.0f} expired (vllm:nixl_*)"))
    for ok, line in checks:
        print(f"{'PASS' if ok else 'FAIL'} {line}")
    return 0 if all(ok for ok, _ in checks) else 1


def idle_cpu(seconds: float, leaders: list[int], limit: float = 0.5) -> int:
    """PASS if the process trees under `leaders` use < `limit` cores while idle (NIXL's progress thread
    spins a whole core per instance unless engines/nixl_cpu is on PYTHONPATH)."""
    roots = [psutil.Process(pid) for pid in leaders]
    procs = [p for r in roots for p in (r, *r.children(recursive=True))]

    def busy() -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    before = busy()
    time.sleep(seconds)
    cores = (busy() - before) / seconds
    ok = cores < limit
    print(f"{'PASS' if ok else 'FAIL'} idle: prefill + decode used {cores:.2f} cores while idle (limit {limit})")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "query":
        return query(argv[1], argv[2])
    if len(argv) >= 3 and argv[0] == "compare":
        return compare(argv[1], argv[2])
    if len(argv) >= 3 and argv[0] == "idle-cpu":
        return idle_cpu(float(argv[1]), [int(a) for a in argv[2:]])
    if len(argv) >= 5 and argv[0] == "evidence":
        return evidence(argv[1], argv[2], int(argv[3]), argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
