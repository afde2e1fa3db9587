"""A generated language and a locally built tokenizer: data for the demo and the tests.

Nothing can be downloaded at run time here, and a demo must run with no input, so kdcache ships
a small stochastic language: each sentence draws a hidden topic, and each next word depends on the
previous word and the topic through a sparse random distribution. Its next-word distributions are
genuinely soft (several plausible continuations), which is where soft targets carry more than
the sampled text does.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that prepends [BOS], like most causal-LM tokenizers."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


class SyntheticLanguage:
    """Sentences from a topic-conditioned first-order Markov chain over `num_words` words."""

    def __init__(self, num_words: int = 256, num_topics: int = 4, branching: int = 12,
                 concentration: float = 0.6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.words = [f"w{index:03d}" for index in range(num_words)]
        self.num_topics = num_topics
        self.transitions = np.zeros((num_topics, num_words, num_words))
        for topic in range(num_topics):
            for word in range(num_words):
                successors = rng.choice(num_words, size=branching, replace=False)
                self.transitions[topic, word, successors] = rng.dirichlet(np.full(branching, concentration))

    def sentences(self, count: int, *, min_words: int = 16, max_words: int = 48, seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        result = []
        for _ in range(count):
            topic = rng.integers(self.num_topics)
            word = rng.integers(len(self.words))
            sentence = [word]
            for _ in range(rng.integers(min_words, max_words + 1) - 1):
                word = rng.choice(len(self.words), p=self.transitions[topic, word])
                sentence.append(word)
            result.append(" ".join(self.words[index] for index in sentence))
        return result
