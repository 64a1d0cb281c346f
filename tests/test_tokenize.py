"""A batch's tokenisation (`scoring.tokenize_all`: each conversation's prompts tokenised once) against each
sample tokenised apart (`scoring.tokenize`, and the chat template + tokenizer call written out): the same
ids, prompt and response lengths, truncation and rejects, on tokenizers of several kinds, and the cases
where the shared path must fall back."""

from __future__ import annotations

import copy
import random

import pytest
from tiny import CHATML, CORPUS, make_tokenizer

from screener.models import ConversationIds, fast_ids, split_tokens, text_ids
from screener.records import Reject, Sample
from screener.scoring import Tokens, tokenize, tokenize_all, truncate

# Llama-2's layout: the generation prompt is the user turn's " [/INST]", and a prompt's last added token
# is the previous turn's "</s>" (or the "<s>" that starts it)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}{% elif m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Llama-3's layout: the text after a prompt's last added token is "\n\n", which a response continues
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _fast(tok, specials: list[str], template: str, **names):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = template
    return fast


def metaspace_tokenizer():
    """SentencePiece-like: Metaspace with `prepend_scheme="first"` (only a text's first piece gets "▁")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    return _fast(tok, specials, LLAMA2, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def split_regex_tokenizer():
    """Llama-3-like: a regex split, then byte-level without its own regex, and an NFC normaliser."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return _fast(tok, specials, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def prefix_space_tokenizer():
    """Byte-level with `add_prefix_space=True`: every piece between added tokens gets a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return _fast(tok, specials, CHATML, eos_token="<|im_end|>")


TOKENIZERS = {
    "chatml": make_tokenizer,
    "metaspace": metaspace_tokenizer,
    "split-regex": split_regex_tokenizer,
    "prefix-space": prefix_space_tokenizer,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


# pieces of messages: whitespace at the ends, unicode (combining marks NFC composes, astral-plane
# characters), and text that is, or looks like, the tokenizers' added tokens
PIECES = [
    "Hello", " world", "the quick brown fox", "  ", " ", "\n", "\n\n", " \n", "\t", "\r\n", "\u00a0",
    "héllo", "e\u0301", "\u0301", "日本語", "🙂", "𝔘", "12345", "!!", "'s", ".",
    "<|im_end|>", "<|im_start|>", "<|im_", "|>", "</s>", "<s>", "[INST]", "<|eot_id|>", "<|end_header_id|>",
]  # fmt: skip


def text(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, n)))


def conversation(rng: random.Random, row: int, turns: int, system: bool, source: str = "f.jsonl") -> list:
    """Every assistant turn of one conversation as a sample, as `--turns all` reads it."""
    messages = [{"role": "system", "content": text(rng)}] if system else []
    samples = []
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng)})
        response = text(rng, 16)
        samples.append(Sample(f"r{row}#{turn}", row, turn, list(messages), response, source))
        messages.append({"role": "assistant", "content": response})
    return samples


def batch(seed: int, n: int = 12) -> list[Sample]:
    """Conversations of 1-6 turns, with and without a system message, in a shuffled batch (a chunk holds
    whole records, but the turns' order is not relied on)."""
    rng = random.Random(seed)
    out = [s for row in range(n) for s in conversation(rng, row, rng.randint(1, 6), row % 3 == 0)]
    rng.shuffle(out)
    return out


def written_out(tok, sample: Sample, max_tokens: int) -> tuple[list[int], list[int], bool]:
    """A sample's ids from the chat template and the tokenizer's call, as the paper's procedure reads it."""
    prompt = tok.apply_chat_template(sample.prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return truncate(prompt_ids, tok(sample.response, add_special_tokens=False)["input_ids"], max_tokens)


def assert_same(tok, samples: list[Sample], max_tokens: int, written: bool = True) -> list:
    got = tokenize_all(tok, samples, max_tokens)
    assert len(got) == len(samples)
    for i, (s, g) in enumerate(zip(samples, got, strict=True)):
        want = tokenize(tok, s, max_tokens, i)
        assert type(g) is type(want), (s, g, want)
        if isinstance(want, Reject):
            assert g == want
            continue
        assert g.sample is s and g.index == i
        assert (g.prompt, g.response, g.truncated) == (want.prompt, want.response, want.truncated), s
        if written:
            assert (g.prompt, g.response, g.truncated) == written_out(tok, s, max_tokens), s
    return got


@pytest.mark.parametrize("seed", range(4))
def test_a_batch_tokenised_at_once_equals_each_sample_apart(tok, seed):
    samples = batch(seed)
    got = assert_same(tok, samples, 2048)
    assert sum(isinstance(g, Tokens) for g in got) > len(samples) // 2


@pytest.mark.parametrize("max_tokens", [16, 24, 40, 96])
def test_long_conversations_truncate_as_apart(tok, max_tokens):
    """Conversations of 12-20 turns, most of whose later prompts are cut to `max_tokens` (their head)."""
    rng = random.Random(max_tokens)
    samples = [s for row in range(3) for s in conversation(rng, row, rng.randint(12, 20), row == 1)]
    got = assert_same(tok, samples, max_tokens)
    assert sum(g.truncated for g in got if isinstance(g, Tokens)) > len(samples) // 2


def shared_prompts(tok, samples: list[Sample]) -> int:
    """How many of the samples' prompts `ConversationIds` took from a longer one, after checking that it gave
    each prompt's own ids."""
    texts = [tok.apply_chat_template(s.prompt, add_generation_prompt=True, tokenize=False) for s in samples]
    ids = ConversationIds(tok)
    assert ids(texts) == [text_ids(tok, t) for t in texts]
    return ids.shared


def test_the_shared_path_is_taken_where_it_applies(tok):
    """Each later turn's prompt comes from the conversation's longest (the test would pass if every prompt
    fell back to its own tokenisation): all but the longest of a conversation's prompts."""
    rng = random.Random(7)
    samples = conversation(rng, 0, 6, True)
    assert split_tokens(tok) is not None
    assert shared_prompts(tok, samples) == len(samples) - 1


def test_whitespace_and_unicode_at_message_ends(tok):
    """Messages that end (or start) with spaces, newlines and tabs, or are only whitespace, and unicode
    that normalisation composes across a message's start."""
    edge = [
        "x ",
        "x\n",
        "x\n\n",
        " x",
        "\nx",
        "  ",
        "\n",
        "\t\n ",
        "e",
        "\u0301e",
        "é\u0301",
        "🙂 ",
        "日本\n",
    ]
    samples = []
    for row, (a, b) in enumerate(zip(edge, edge[::-1], strict=True)):
        messages = [{"role": "system", "content": b}] if row % 2 else []
        for turn in range(3):
            messages.append({"role": "user", "content": a + str(turn) + b})
            response = b + a if turn != 1 else a
            samples.append(Sample(f"e{row}#{turn}", row, turn, list(messages), response))
            messages.append({"role": "assistant", "content": response})
    assert_same(tok, samples, 2048)


def test_messages_holding_added_token_text(tok):
    """A message that contains an added token's text, or part of it at its end (`<|im_`), which the
    template's next token completes into text that is no added token."""
    samples = []
    for row, piece in enumerate(
        ["<|im_end|>", "<|im_", "<|im_start|>assistant\n", "</s>", "<|eot_id|>", "<"]
    ):
        messages = []
        for turn in range(3):
            messages.append({"role": "user", "content": f"q{turn} {piece}"})
            samples.append(
                Sample(f"a{row}#{turn}", row, turn, list(messages), f"{piece}answer {turn}{piece}")
            )
            messages.append({"role": "assistant", "content": f"{piece}answer {turn}{piece}"})
    assert_same(tok, samples, 2048)


def test_rejects_are_the_same():
    """A template that raises (non-alternating roles) and an empty response: the same rejects, each on
    its own sample, while the conversation's other turns are scored."""
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    user, assistant = ({"role": r, "content": f"{r} text"} for r in ("user", "assistant"))
    samples = [
        Sample("ok#0", 0, 0, [user], "fine"),
        Sample("ok#1", 0, 1, [user, assistant, user], "fine again"),
        Sample("bad#1", 0, 2, [user, assistant, user, assistant, assistant, user], "never read"),
        Sample("empty#3", 0, 3, [user, assistant, user, assistant, user], ""),
    ]
    got = assert_same(tok, samples, 2048, written=False)
    assert [type(g) for g in got] == [Tokens, Tokens, Reject, Reject]
    assert "roles must alternate" in got[2].reason and got[3].reason == "response: no tokens"


def test_huge_messages_are_cut_as_apart(tok):
    """Messages far past `max_tokens` are cut in characters (`cut_text`) once per batch, the same cut as
    each sample's own."""
    long = " ".join(CORPUS) * 60  # ~16k characters, past 8 x (max_tokens + 64)
    messages, samples = [{"role": "system", "content": long}], []
    for turn in range(4):
        messages.append({"role": "user", "content": long if turn % 2 else "short"})
        samples.append(Sample(f"h#{turn}", 0, turn, list(messages), long if turn == 2 else "ok"))
        messages.append({"role": "assistant", "content": long if turn == 2 else "ok"})
    got = assert_same(tok, samples, 64, written=False)
    assert all(g.truncated for g in got)


# ---- where the shared path must not be taken --------------------------------------------------------


def test_a_template_that_rewrites_earlier_turns_tokenises_each_prompt_apart():
    """The system prompt counts the messages: no prompt is a prefix of another."""
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = (
        "{{ '<|im_start|>system\nturns: ' + (messages|length|string) + '<|im_end|>\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    samples = batch(11)
    assert_same(tok, samples, 2048)
    assert shared_prompts(tok, samples) == 0


def test_a_generation_prompt_the_next_turn_does_not_repeat_tokenises_each_prompt_apart():
    """The generation prompt opens a think block that the rendered assistant turns do not have."""
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    rng = random.Random(3)
    samples = conversation(rng, 0, 5, True)
    assert_same(tok, samples, 2048)
    assert shared_prompts(tok, samples) == 0


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word", "normalized"])
def test_an_added_token_that_is_not_cut_out_plainly_tokenises_each_prompt_apart(flag):
    """An added token that strips the whitespace beside it, matches whole words only or is matched after
    normalisation: text between added tokens is no longer tokenised as it stands, so no sharing."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(make_tokenizer())
    tok.add_tokens([AddedToken("<|sep|>", special=False, **({"normalized": False} | {flag: True}))])
    tok.chat_template = CHATML.replace("+ '\n' + message['content']", "+ '\n <|sep|> ' + message['content']")
    assert split_tokens(tok) is None
    samples = batch(5)
    assert_same(tok, samples, 2048)
    assert shared_prompts(tok, samples) == 0


def test_special_tokens_split_as_text_tokenises_each_prompt_apart():
    tok = copy.deepcopy(make_tokenizer())
    tok.split_special_tokens = True
    assert split_tokens(tok) is None
    assert_same(tok, batch(6), 2048)


class NotFast:
    """A tokenizer without a fast backend (`is_fast` False), as a slow tokenizer is."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_slow_tokenizer_tokenises_each_prompt_apart():
    tok = NotFast(make_tokenizer())
    assert split_tokens(tok) is None and fast_ids(tok)("Hello <|im_end|> x") == text_ids(
        tok, "Hello <|im_end|> x"
    )
    assert_same(tok, batch(8), 2048)


def test_fast_ids_equal_the_tokenizers_call(tok):
    rng = random.Random(0)
    encode = fast_ids(tok)
    for _ in range(200):
        t = text(rng, 24)
        assert encode(t) == text_ids(tok, t)
    # a backend left with truncation set: the tokenizer's own call (which clears it) is used
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.enable_truncation(4)
    long = " ".join(CORPUS)
    assert fast_ids(tok)(long) == text_ids(tok, long) and len(text_ids(tok, long)) > 4
