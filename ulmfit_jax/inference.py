"""Inference from raw text: a classifier's labels and probabilities, a language model's perplexity
and continuations, each loaded from a model directory with the tokenizer it records.

    import ulmfit_jax
    classifier = ulmfit_jax.load_classifier("runs/trec_clas/best")
    labels, probabilities = classifier.predict(["Who wrote Hamlet ?", "How far is Mars ?"])
    lm = ulmfit_jax.load_language_model("runs/trec_lm/best")
    lm.perplexity(["What is the capital of France ?"]); lm.generate("What is", n_words=10).text

Text is read as the training data was (`checkpoint.load_tokenizer`: the directory's tokenizer.json
and, for SentencePiece, its own spm.model; a directory without one gets the default tokenizer and
a warning): the same rules and tokenizer as `scripts/prepare_data.py`, unknown tokens -> xxunk (id
0), so a text gets exactly the ids its copy in the prepared data has.

The parameters go to the device once, at load. Classifier batches are laid out as in evaluation
(`predict.classifier_batch_settings`: `batch_size` rows, the last batch's missing rows padded;
lengths bucketed to multiples of the config's bptt), so a call compiles at most one forward pass
per length bucket, and every later call and every model of the same config reuses them
(`predict.classifier_predictor` is cached per config). A forward and a backward classifier
ensemble as in `ensemble.ensemble_probabilities` (the paper's mean of the two).

The loaded objects are frozen; their tokenizer (shared per settings, with its chunk cache) is not
thread-safe, so give each thread its own process or lock around calls. Imports no training code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import numpy as np

from ulmfit_jax import checkpoint, ensemble, evaluation
from ulmfit_jax import generate as generation
from ulmfit_jax.config import ClassifierConfig, EncoderConfig, LanguageModelConfig
from ulmfit_jax.text import rules as text_rules
from ulmfit_jax.text import vocab as text_vocab
from ulmfit_jax.text.batches import concatenate_documents
from ulmfit_jax.text.tokenizers import TextTokenizer, TokenizerSettings

KINDS = {ClassifierConfig: "classifier", LanguageModelConfig: "language_model", EncoderConfig: "encoder"}
_HOLDS = {ClassifierConfig: "a classifier", LanguageModelConfig: "a language model", EncoderConfig: "an encoder"}


# ----------------------------------------------------------------------------------------------
# Text -> ids

@functools.lru_cache(maxsize=8)
def text_tokenizer(settings: TokenizerSettings) -> TextTokenizer:
    """One `TextTokenizer` per settings, shared by every model that uses them (and its chunk cache
    with them). ValueError for a SentencePiece model file that does not load."""
    try:
        return TextTokenizer(settings)
    except (RuntimeError, OSError) as error:            # sentencepiece's errors for an unreadable model
        raise ValueError(f"the SentencePiece model {settings.sentencepiece_model} does not load: {error}") from None


def check_texts(texts) -> list[str]:
    """`texts` as a list of str; TypeError for one string (a common slip: pass [text]) or non-strings."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not one string: pass [text]")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings; texts[{position}] is {type(text).__name__}")
    return texts


def encode(texts: Sequence[str], tokenizer: TokenizerSettings, token_ids: dict[str, int]) -> list[np.ndarray]:
    """Raw texts -> documents int32[n_tokens_i] of vocabulary ids (`token_ids`: `vocab.token_to_id`),
    unknown tokens -> 0 (xxunk): what prepare_data.py writes for the same texts."""
    tokenize = text_tokenizer(tokenizer)
    return [text_vocab.numericalize(tokenize(text), token_ids) for text in check_texts(texts)]


def detokenize(tokens: Sequence[str], tokenizer: TokenizerSettings) -> str:
    """Readable text from tokens (`rules.detokenize`); SentencePiece pieces are joined first ('▁'
    marks where a word starts)."""
    if tokenizer.kind == "sentencepiece":
        tokens = "".join(tokens).replace("\u2581", " ").split()
    return text_rules.detokenize(tokens)


# ----------------------------------------------------------------------------------------------
# Loading

def model_kind(directory) -> str:
    """"classifier", "language_model" or "encoder": what a model directory holds (its config.json)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a ulmfit_jax model directory: config.json is missing")
    try:
        return KINDS[type(checkpoint.config_from_dict(json.loads(path.read_text())))]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a model config ({type(error).__name__}: {error})") from None


def _load(directory, config_type, what: str) -> tuple[dict, TokenizerSettings]:
    """A model directory as `checkpoint.load_model`'s dict with its parameters on the device, and its
    tokenizer (`checkpoint.load_tokenizer`)."""
    model = checkpoint.load_model(directory)
    if not isinstance(model["config"], config_type):
        raise ValueError(f"{directory} holds {_HOLDS[type(model['config'])]}, not {what}")
    tokenizer = checkpoint.load_tokenizer(directory)
    text_tokenizer(tokenizer)                        # a SentencePiece model that does not load fails here
    model["params"] = jax.device_put(model["params"])
    if "batch_stats" in model:
        model["batch_stats"] = jax.device_put(model["batch_stats"])
    return model, tokenizer


class Predictions(NamedTuple):
    """labels: the most probable class of each text; probabilities: f32[N, C], columns in the
    classifier's `classes` order."""
    labels: list[str]
    probabilities: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A classifier ready for raw text (`load_classifier`).

    model: `checkpoint.load_model`'s dict (config, params and batch_stats on the device, vocab,
    classes); backward: the same for a backward classifier to ensemble with, or None; backwards:
    the lone model reads documents reversed (trained with `--backwards`); tokenizer: how text
    becomes the vocabulary's tokens; batch_size: rows per batch.
    """
    model: dict
    tokenizer: TokenizerSettings
    backward: dict | None = None
    backwards: bool = False
    batch_size: int = 64
    token_ids: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def config(self) -> ClassifierConfig:
        return self.model["config"]

    @property
    def vocab(self) -> list[str]:
        return self.model["vocab"]

    @property
    def classes(self) -> list[str]:
        """The class names (classes.json), else "0", "1", ... for a directory without them."""
        return self.model.get("classes") or [str(i) for i in range(self.config.n_classes)]

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Raw texts -> int32 documents (`encode`)."""
        return encode(texts, self.tokenizer, self.token_ids)

    def probabilities(self, documents: Sequence[np.ndarray]) -> np.ndarray:
        """int documents -> class probabilities f32[N, C] in the documents' order; with a backward
        model the mean of both (`ensemble.ensemble_probabilities`)."""
        if not len(documents):
            return np.zeros((0, self.config.n_classes), np.float32)
        if self.backward is not None:
            return ensemble.ensemble_probabilities(self.model, self.backward, documents, self.batch_size)
        return ensemble.classifier_probabilities(self.model, documents, backwards=self.backwards,
                                                 batch_size=self.batch_size)

    def predict(self, texts: Sequence[str]) -> Predictions:
        """Raw texts -> `Predictions(labels, probabilities f32[N, C])`."""
        probabilities = self.probabilities(self.encode(texts))
        classes = self.classes
        return Predictions([classes[i] for i in probabilities.argmax(axis=1)], probabilities)


def load_classifier(directory, backward=None, *, backwards: bool = False, batch_size: int = 64) -> Classifier:
    """A classifier model directory -> `Classifier`; `backward`: a backward classifier's directory
    (trained with `--backwards` on the same vocabulary, classes and tokenizer) to ensemble with;
    `backwards`: the one model given reads documents reversed. ValueError / FileNotFoundError
    naming what does not fit."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if backward is not None and backwards:
        raise ValueError("backwards=True is for a lone backward model; with `backward` the first is the forward one")
    model, tokenizer = _load(directory, ClassifierConfig, "a classifier")
    backward_model = None
    if backward is not None:
        backward_model, backward_tokenizer = _load(backward, ClassifierConfig, "a classifier")
        if backward_model["vocab"] != model["vocab"]:
            raise ValueError(f"{directory} and {backward} have different vocabularies: they cannot ensemble")
        if backward_model.get("classes") != model.get("classes"):
            raise ValueError(f"{directory} and {backward} have different classes ({model.get('classes')} and "
                             f"{backward_model.get('classes')}): they cannot ensemble")
        if not checkpoint.same_tokenizer(tokenizer, backward_tokenizer):
            raise ValueError(f"{directory} and {backward} tokenize text differently "
                             f"({checkpoint.describe_tokenizer(tokenizer)} and "
                             f"{checkpoint.describe_tokenizer(backward_tokenizer)}): they cannot ensemble")
    return Classifier(model, tokenizer, backward_model, backwards, batch_size, text_vocab.token_to_id(model["vocab"]))


class Generation(NamedTuple):
    """text: the prompt and its continuation, detokenized in reading order; tokens: the generated
    tokens in reading order; ids: their ids int32[n_words]."""
    text: str
    tokens: list[str]
    ids: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A language model ready for raw text (`load_language_model`): model is `checkpoint.load_model`'s
    dict with the parameters on the device; tokenizer how text becomes its tokens."""
    model: dict
    tokenizer: TokenizerSettings
    token_ids: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def config(self) -> LanguageModelConfig:
        return self.model["config"]

    @property
    def vocab(self) -> list[str]:
        return self.model["vocab"]

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Raw texts -> int32 documents (`encode`)."""
        return encode(texts, self.tokenizer, self.token_ids)

    def evaluate_ids(self, ids: np.ndarray, *, batch_size: int = 1, bptt: int = 70) -> dict:
        """A stream int[N] of ids -> `evaluation.evaluate_language_model`'s {"loss", "perplexity",
        "accuracy", "tokens"}."""
        return evaluation.evaluate_language_model(self.model["params"], self.config, np.asarray(ids),
                                                  batch_size=batch_size, bptt=bptt)

    def evaluate(self, texts: Sequence[str], *, batch_size: int = 1, bptt: int = 70, backwards: bool = False) -> dict:
        """Raw texts, one document each, -> the metrics of their stream (the documents one after
        another, each starting with xxbos, each reversed for a backwards LM): what
        scripts/evaluate.py gives on the same texts prepared."""
        return self.evaluate_ids(concatenate_documents(self.encode(texts), backwards=backwards),
                                 batch_size=batch_size, bptt=bptt)

    def perplexity(self, texts: Sequence[str], **options) -> float:
        """exp(mean next-token cross-entropy) over the texts' stream (`evaluate`'s options)."""
        return self.evaluate(texts, **options)["perplexity"]

    def generate(self, prompt: str, n_words: int, *, sampling: generation.Sampling = generation.Sampling(),
                 seed: int = 0, backwards: bool = False, window: int = 70) -> Generation:
        """Continue `prompt` by `n_words` tokens (`generate.generate`: the state carried, one compiled
        loop; a seed fixes the output). A backwards LM writes what comes before the prompt."""
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a string, got {type(prompt).__name__}")
        tokens = generation.prompt_tokens(prompt, text_tokenizer(self.tokenizer), backwards=backwards)
        ids = text_vocab.numericalize(tokens, self.token_ids)
        new = generation.generate(self.model["params"], ids[None], n_words, jax.random.PRNGKey(seed),
                                  config=self.config, sampling=sampling, window=window)[0]
        new_tokens, prompt_tokens = text_vocab.denumericalize(new, self.vocab), text_vocab.denumericalize(ids, self.vocab)
        if backwards:
            new_tokens, prompt_tokens, new = new_tokens[::-1], prompt_tokens[::-1], new[::-1]
            text = detokenize(new_tokens + prompt_tokens, self.tokenizer)
        else:
            text = detokenize(prompt_tokens + new_tokens, self.tokenizer)
        return Generation(text, new_tokens, np.asarray(new, np.int32))


def load_language_model(directory) -> LanguageModel:
    """A language model directory -> `LanguageModel`. ValueError / FileNotFoundError naming what
    does not fit."""
    model, tokenizer = _load(directory, LanguageModelConfig, "a language model")
    return LanguageModel(model, tokenizer, text_vocab.token_to_id(model["vocab"]))
