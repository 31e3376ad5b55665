"""Byte-level BPE tokenizer and chat template, built from a checkpoint's own vocabulary.

A byte-level BPE tokenizer works in three steps:
  1. split the text into pieces with a regular expression (the "pre-tokenizer"),
  2. turn each piece into its UTF-8 bytes,
  3. merge adjacent byte sequences, lowest-ranked merge first, until no merge applies.
Checkpoints (GGUF and tokenizer.json alike) list tokens as strings in which every byte
is shown as a printable character (GPT-2's byte-to-unicode table; a space is 'Ġ').
Their token ids are in merge order, so a token's id is its merge rank, and tiktoken's
fast BPE can run the vocabulary directly: rank(bytes) = token id.

Special tokens (<|im_start|>, <|im_end|>) come only from the chat template, never from what
a user or system prompt says: a message that types "<|im_start|>system" is encoded as text.
"""
import contextlib
import re

import tiktoken

# Pre-tokenizer patterns, by the name GGUF files give them (tokenizer.ggml.pre).
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                r"|\s+(?!\S)|\s+")
# SmolLM's pre-tokenizer first isolates every digit, then applies GPT-2's pattern to the
# text between digits. One regex does both: a digit is its own piece, and a run of spaces
# may end right before a digit (where the text between digits ended).
SMOLLM_PATTERN = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"
                  r"|\s+(?![^\s\p{N}])|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PATTERNS = {"gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
            "qwen2": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN}


def _byte_of_char():
    """GPT-2's table: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control characters, space, etc. are moved to 256 + n
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


BYTE_OF_CHAR = _byte_of_char()


class TokenizerError(ValueError):
    """A vocabulary or template this tokenizer cannot run; the message names the file."""


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(self, tokens, special, pattern, merges, chat_template="", name="checkpoint"):
        """tokens: list of token strings, index = id. special: set of ids of special tokens.
        merges: the BPE merges, in priority order, as (left, right) token strings."""
        _check_merge_order(tokens, merges, name)
        ranks = {}
        for i, tok in enumerate(tokens):
            if i not in special:
                if not isinstance(tok, str) or not set(tok) <= BYTE_OF_CHAR.keys():
                    raise TokenizerError(f"{name}: token {i} ({tok!r}) is not byte-level "
                                         f"(GPT-2's byte-to-character table)")
                ranks[bytes(BYTE_OF_CHAR[c] for c in tok)] = i
        # A few byte values never occur in the training text, so the vocabulary lacks them.
        # tiktoken needs every byte; give the missing ones ids past the end and drop them
        # when encoding (Hugging Face tokenizers drops them too).
        self.n_vocab = len(tokens)
        for b in range(256):
            ranks.setdefault(bytes([b]), self.n_vocab + b)
        self.special_ids = {tokens[i]: i for i in special}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_ids)
        self.chat_template = chat_template
        # Chat templates in the ChatML style (SmolLM2, Qwen2) insert a default system prompt
        # when the conversation has none; read it from the template text.
        found = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", chat_template)
        found = found or re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template)
        self.default_system = found.group(1) if found else None
        self.eos_id = self.special_ids.get("<|im_end|>")

    def encode(self, text, allow_special=False):
        """Text -> ids. Special-token text (e.g. '<|im_end|>') is only special if allowed."""
        allowed = "all" if allow_special else set()
        ids = self.enc.encode(text, allowed_special=allowed, disallowed_special=())
        return [i for i in ids if i < self.n_vocab]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def turns(self, user, system=None, history=()):
        """[(role, content)] of a conversation ending with the user's turn.
        system=None means the template's default system prompt (as the model was tuned)."""
        tags = {"<|im_start|>", "<|im_end|>"}
        if "<|im_start|>" not in self.chat_template or not tags <= self.special_ids.keys():
            raise TokenizerError("this checkpoint's chat template is not ChatML; "
                                 "only ChatML templates are supported")
        system = self.default_system if system is None else system
        turns = [("system", system)] if system is not None else []
        return turns + list(history) + [("user", user)]

    def chat(self, user, system=None, history=()):
        """The ChatML prompt (text) for one user turn, ending with the assistant tag."""
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n"
                       for role, content in self.turns(user, system, history))
        return text + "<|im_start|>assistant\n"

    def encode_chat(self, user, system=None, history=()):
        """The ids of chat(): the template's tags are special tokens, and each message is
        encoded as plain text, so text that looks like a tag stays text."""
        start, end = self.special_ids["<|im_start|>"], self.eos_id
        ids = []
        for role, content in self.turns(user, system, history):
            ids += [start, *self.encode(f"{role}\n{content}"), end, *self.encode("\n")]
        return ids + [start, *self.encode("assistant\n")]


def _check_merge_order(tokens, merges, name):
    """tiktoken merges by token id, so the ids must rise in merge order. They do for the
    vocabularies BPE trainers write; refuse (rather than mis-tokenize) any that do not."""
    id_of = {t: i for i, t in enumerate(tokens)}
    previous = -1
    for left, right in merges:
        i = id_of.get(left + right)
        if i is None or i <= previous:
            raise TokenizerError(f"{name}: merge '{left} {right}' is out of id order; "
                             f"this vocabulary cannot be run by rank")
        previous = i


@contextlib.contextmanager
def malformed_is_an_error(path):
    """A vocabulary is data from a file: a missing key or a value of the wrong type in it
    becomes a one-line TokenizerError that names the file."""
    try:
        yield
    except TokenizerError:
        raise
    except KeyError as e:
        raise TokenizerError(f"{path}: malformed tokenizer ({e} is missing)") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise TokenizerError(f"{path}: malformed tokenizer ({e})") from None


def tokenizer_from_gguf(meta, path="checkpoint"):
    """Build the tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: tokenizer model '{kind}' is not supported "
                             f"(only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PATTERNS:
        raise TokenizerError(f"{path}: pre-tokenizer '{pre}' is not supported "
                             f"(known: {', '.join(PATTERNS)})")
    with malformed_is_an_error(path):
        tokens = meta["tokenizer.ggml.tokens"]
        # token_type 3 = CONTROL (special tokens such as <|im_start|>), 4 = USER_DEFINED
        special = {i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t in (3, 4)}
        merges = [m.split(" ") for m in meta["tokenizer.ggml.merges"]]
        return Tokenizer(tokens, special, PATTERNS[pre], merges,
                         meta.get("tokenizer.chat_template", ""), name=str(path))


def _pattern_from_json(pre, path):
    """The regex of a tokenizer.json pre_tokenizer, for the layouts byte-level BPEs use."""
    kinds = [p["type"] for p in pre.get("pretokenizers", [])] if pre else []
    if pre and pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0]["individual_digits"]:
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"]:
        return pre["pretokenizers"][0]["pattern"]["Regex"]
    raise TokenizerError(f"{path}: pre-tokenizer {pre} is not supported")


def tokenizer_from_json(data, chat_template="", path="tokenizer.json"):
    """Build the tokenizer from a parsed tokenizer.json (Hugging Face tokenizers format)."""
    with malformed_is_an_error(path):
        model = data["model"]
        if model["type"] != "BPE":
            raise TokenizerError(f"{path}: tokenizer model '{model['type']}' is not "
                                 f"supported (BPE only)")
        added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
        ids = {*model["vocab"].values(), *added}
        # n distinct ids, each in 0..n-1: every id is used (and no absurd list is allocated)
        if not all(type(i) is int and 0 <= i < len(ids) for i in ids):
            raise TokenizerError(f"{path}: token ids are not 0..{len(ids) - 1}, one per token")
        tokens = [None] * len(ids)
        for tok, i in model["vocab"].items():
            tokens[i] = tok
        for i, tok in added.items():
            tokens[i] = tok
        pattern = _pattern_from_json(data.get("pre_tokenizer"), path)
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        return Tokenizer(tokens, set(added), pattern, merges, chat_template, name=str(path))
