#!/usr/bin/env python
"""Continue a prompt with a language model, the hidden state carried (O(n) in the output length).

  python scripts/generate.py --model DIR --prompt "The history of" --n-words 40 --temperature 0.75

The prompt is tokenized as the model's training text was (the tokenizer its directory records;
fastai's rules, so `xxbos` first), run once, then the new tokens are sampled in one compiled loop
(`ulmfit_jax.load_language_model(DIR).generate`). `--n-words` counts tokens, as fastai's
`LMLearner.predict(n_words=...)` does. With `--backwards` (a backwards LM) the model writes what
comes before the prompt. The last stdout line is JSON: {"prompt", "text": prompt and continuation
detokenized, "tokens": the generated tokens in reading order, "seconds": wall time of the
generation, compiles included, "tokens_per_s": generated tokens per second of it}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulmfit_jax import generate  # noqa: E402
from ulmfit_jax.inference import load_language_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ulmfit_jax language model directory")
    parser.add_argument("--prompt", required=True, help="raw text to continue")
    parser.add_argument("--n-words", type=int, required=True, help="number of tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="sample from p ** (1 / T) (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most probable tokens (1 = greedy)")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens with probability below this")
    parser.add_argument("--no-unk", dest="no_unk", action="store_true", default=True,
                        help="never generate xxunk (default, as fastai)")
    parser.add_argument("--allow-unk", dest="no_unk", action="store_false", help="xxunk may be generated")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")
    parser.add_argument("--backwards", action="store_true", help="the model is a backwards LM: generate to the left")
    parser.add_argument("--window", type=int, default=70, help="prompt tokens per model call (default 70)")
    args = parser.parse_args(argv)
    if args.n_words < 1:
        raise SystemExit(f"error: --n-words must be at least 1, got {args.n_words}")
    try:
        sampling = generate.Sampling(temperature=args.temperature, top_k=args.top_k, min_p=args.min_p,
                                     no_unk=args.no_unk)
        model = load_language_model(args.model)
        start = time.perf_counter()
        out = model.generate(args.prompt, args.n_words, sampling=sampling, seed=args.seed,
                             backwards=args.backwards, window=args.window)
        seconds = time.perf_counter() - start
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    print(json.dumps({"prompt": args.prompt, "text": out.text, "tokens": out.tokens, "seconds": round(seconds, 4),
                      "tokens_per_s": round(len(out.tokens) / seconds, 1)}))


if __name__ == "__main__":
    main()
