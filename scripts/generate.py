#!/usr/bin/env python
"""Continue a prompt with a language model, the hidden state carried (O(n) in the output length).

  python scripts/generate.py --model DIR --prompt "The history of" --n-words 40 --temperature 0.75

The prompt is tokenized as in training (fastai's rules and the default tokenizer, so `xxbos`
first), run once, then the new tokens are sampled in one compiled loop (`ulmfit_jax.generate`).
`--n-words` counts tokens, as fastai's `LMLearner.predict(n_words=...)` does. With `--backwards` (a backwards LM)
the model writes what comes before the prompt. The last stdout line is JSON:
{"prompt", "text": prompt and continuation detokenized, "tokens": the generated tokens in reading
order, "seconds": wall time of the generation, compiles included, "tokens_per_s": generated tokens
per second of it}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from ulmfit_jax import checkpoint, generate  # noqa: E402
from ulmfit_jax.config import LanguageModelConfig  # noqa: E402
from ulmfit_jax.text import rules, vocab as text_vocab  # noqa: E402
from ulmfit_jax.text.tokenizers import TextTokenizer  # noqa: E402


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
        model = checkpoint.load_model(args.model)
        if not isinstance(model["config"], LanguageModelConfig):
            raise ValueError(f"{args.model} holds a classifier, not a language model")
        vocab = model["vocab"]
        tokens = generate.prompt_tokens(args.prompt, TextTokenizer(), backwards=args.backwards)
        ids = text_vocab.numericalize(tokens, text_vocab.token_to_id(vocab))
        start = time.perf_counter()
        out = generate.generate(model["params"], ids[None], args.n_words, jax.random.PRNGKey(args.seed),
                                config=model["config"], sampling=sampling, window=args.window)[0]
        seconds = time.perf_counter() - start
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    new_tokens = text_vocab.denumericalize(out, vocab)
    prompt_tokens = text_vocab.denumericalize(ids, vocab)
    if args.backwards:
        new_tokens, prompt_tokens = new_tokens[::-1], prompt_tokens[::-1]
        text = rules.detokenize(new_tokens + prompt_tokens)
    else:
        text = rules.detokenize(prompt_tokens + new_tokens)
    print(json.dumps({"prompt": args.prompt, "text": text, "tokens": new_tokens, "seconds": round(seconds, 4),
                      "tokens_per_s": round(len(out) / seconds, 1)}))


if __name__ == "__main__":
    main()
