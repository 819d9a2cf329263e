"""Text classification data: a generated review-sentiment task that ships offline, Parquet text files, and a
word-level tokenizer built offline (pad id 0, every sequence starts with [CLS])."""
from __future__ import annotations

import numpy as np

from dwf_ray import store
from dwf_ray.data.folders import one_line

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]   # ids 0, 1, 2, 3

# -- the generated task ------------------------------------------------------------------------------
_ASPECTS = ["food", "pasta", "soup", "pizza", "dessert", "coffee", "wine", "bread", "salad", "steak",
            "service", "staff", "waiter", "owner", "menu", "price", "decor", "music", "room", "view",
            "table", "location", "parking", "terrace", "portion", "kitchen", "bar", "lighting"]
_POSITIVE = ["good", "great", "excellent", "tasty", "friendly", "lovely", "fresh", "amazing", "perfect",
             "nice", "pleasant", "superb", "delightful", "wonderful", "clean", "cozy", "generous", "fair",
             "quick", "charming"]
_NEGATIVE = ["bad", "awful", "terrible", "bland", "rude", "cold", "stale", "slow", "dirty", "noisy",
             "overpriced", "poor", "greasy", "boring", "dull", "soggy", "cramped", "horrible", "mediocre",
             "disappointing"]
_VERBS = ["was", "is", "seemed", "felt", "looked", "tasted", "appeared"]
_NEGATORS = ["not", "never", "hardly"]
_INTENSIFIERS = ["very", "really", "quite", "so", "extremely", "rather", "pretty", "truly"]
_FORMS = ["single", "and", "but", "although_first", "although_second"]
_FORM_CDF = np.cumsum([0.2, 0.2, 0.25, 0.175, 0.175])[:-1]
_OPENERS = ["honestly", "overall", "well", "frankly", "in short", "to be fair", "i think", "sadly", "luckily"]


def synth_vocabulary() -> set[str]:
    """Every word (and the comma) that generated reviews use; each occurs in any few thousand of them."""
    phrases = _ASPECTS + _POSITIVE + _NEGATIVE + _VERBS + _NEGATORS + _INTENSIFIERS + _OPENERS
    return {"the", "and", "but", "although", ","} | {w for p in phrases for w in p.split()}


SYNTH_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(synth_vocabulary())   # the text-synth tokenizer's vocabulary


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[rng.integers(len(words))]


def _clause(rng: np.random.Generator) -> tuple[str, int]:
    """'the <aspect> <verb> [negator] [intensifier] <adjective>' and its polarity (+1 / -1)."""
    positive = rng.random() < 0.5
    adj = _pick(rng, _POSITIVE if positive else _NEGATIVE)
    words = ["the", _pick(rng, _ASPECTS), _pick(rng, _VERBS)]
    negated = rng.random() < 0.3
    if negated:
        words.append(_pick(rng, _NEGATORS))
    if rng.random() < 0.4:
        words.append(_pick(rng, _INTENSIFIERS))
    words.append(adj)
    return " ".join(words), (1 if positive else -1) * (-1 if negated else 1)


def synth_review(rng: np.random.Generator) -> tuple[str, int]:
    """One review and its label (1 positive, 0 negative), decided by the review's main clause.

    Forms: 'C'; 'C1 and C2' (same polarity); 'C1 but C2' (C2 decides); 'although C1 , C2' (C2 decides);
    'C1 , although C2' (C1 decides). Negators flip a clause; openers and intensifiers carry no polarity.
    """
    form = _FORMS[np.searchsorted(_FORM_CDF, rng.random(), side="right")]
    c1, p1 = _clause(rng)
    c2, p2 = _clause(rng)
    if form == "and":
        while p2 != p1:
            c2, p2 = _clause(rng)
    if form == "single":
        text, label = c1, p1
    elif form == "and":
        text, label = f"{c1} and {c2}", p1
    elif form == "but":
        text, label = f"{c1} but {c2}", p2
    elif form == "although_first":
        text, label = f"although {c1} , {c2}", p2
    else:
        text, label = f"{c1} , although {c2}", p1
    if rng.random() < 0.3:
        text = f"{_pick(rng, _OPENERS)} , {text}"
    return text, int(label > 0)


def synth_reviews(n: int, seed: int = 0, label_noise: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated reviews and labels; a fraction ``label_noise`` of labels is flipped (annotation noise)."""
    rng = np.random.default_rng(seed)
    texts, labels = zip(*(synth_review(rng) for _ in range(n)))
    y = np.array(labels, dtype=np.int64)
    flip = rng.random(n) < label_noise
    y[flip] = 1 - y[flip]
    return np.array(texts, dtype=object), y


# -- Parquet text ------------------------------------------------------------------------------------
def read_parquet_texts(uris: list[str], text_column: str = "text", label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(texts, raw labels) of one or more Parquet files (local or s3://)."""
    texts, labels = [], []
    for uri in uris:
        try:
            table = store.read_table(uri)
        except Exception as exc:  # pyarrow raises several error types for bad files
            raise ValueError(f"{uri}: not a readable Parquet file ({one_line(exc)})") from exc
        missing = [c for c in (text_column, label_column) if c not in table.columns]
        if missing:
            raise ValueError(f"{uri}: missing column(s) {missing}; columns are {list(table.columns)}")
        texts.append(table[text_column].astype(str).to_numpy(dtype=object))
        labels.append(table[label_column].to_numpy())
    return np.concatenate(texts), np.concatenate(labels)


# -- tokenizer ---------------------------------------------------------------------------------------
def _finish(tok, max_len: int):
    """Every sequence: [CLS] + words, truncated and padded with id 0 to ``max_len``."""
    from tokenizers.processors import TemplateProcessing
    if tok.token_to_id("[PAD]") != 0 or tok.token_to_id("[CLS]") is None:
        raise ValueError("tokenizer: needs a [PAD] token with id 0 and a [CLS] token")
    tok.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", tok.token_to_id("[CLS]"))])
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)
    return tok


def build_tokenizer(texts, vocab_size: int, max_len: int, min_frequency: int = 1):
    """A lower-casing word-level tokenizer whose vocabulary is learnt from ``texts`` (offline)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                          special_tokens=SPECIAL_TOKENS, show_progress=False))
    return _finish(tok, max_len)


def load_tokenizer(uri: str, max_len: int):
    """A saved ``tokenizers`` JSON file (e.g. a WordPiece vocabulary), local or s3://."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(store.read_bytes(uri).decode())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: tokenizer file not found") from exc
    except Exception as exc:
        raise ValueError(f"{uri}: not a tokenizers JSON file ({one_line(exc)})") from exc
    try:
        return _finish(tok, max_len)
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from exc


def encode(tok, texts) -> np.ndarray:
    """Token ids (N, max_len) int64."""
    return np.array([e.ids for e in tok.encode_batch(list(texts))], dtype=np.int64)
