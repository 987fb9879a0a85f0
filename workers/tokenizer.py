"""Text to token ids and back for one served model, and its chat template.

A thin layer over Hugging Face `tokenizers`: the model's own BOS/EOS conventions, chat rendering the
way transformers renders it, and a streaming decoder that never emits half a UTF-8 character.

Chat message content is always text: a message that spells a control token (`<|im_end|>`,
`<|start_header_id|>`) gets the token's characters, never the token, so no caller can close its
turn and forge a system one. Only the chat template's own markers are control tokens. A raw
prompt is the caller's whole input and is tokenized as it is, control tokens included.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# What a byte-level decoder writes for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"
# Stand-ins for message content while the template renders (Unicode private use, plane 15).
_CONTENT_MARK = re.compile("\U000f0000([0-9]+)\U000f0001")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in a vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM's (StarCoder's) tokenizer.json: every digit stands alone, then GPT-2's split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_split,
    "gpt-2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
}
"""How text is split before BPE, by llama.cpp's name for it (GGUF `tokenizer.ggml.pre`)."""


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], *, pre_tokenizer: str,
                   special_tokens: Iterable[str] = (), added_tokens: Iterable[str] = ()) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer from a vocabulary listing (token id = position).

    `merges` are "left right" pairs, best first. `special_tokens` (BOS, `<|im_start|>`, ...) and
    `added_tokens` are matched whole in the input text before BPE; only special ones are dropped
    when decoding with special tokens skipped.
    """
    if pre_tokenizer not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported pre-tokenizer {pre_tokenizer!r}; supported: {sorted(PRE_TOKENIZERS)}")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre_tokenizer]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in added_tokens])
    return backend


class Tokenizer:
    """A model's tokenizer: encoding with its BOS convention, decoding, and its chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool, chat_template: str | None, extra_eos_token_ids: Iterable[int] = ()) -> None:
        """`eos_token_id` is the one templates see as `eos_token`; generation also stops on the extras."""
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        extra_eos_token_ids = tuple(extra_eos_token_ids)
        for token_id in (bos_token_id, eos_token_id, *extra_eos_token_ids):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"special token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no BOS token")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(
            token_id for token_id in (eos_token_id, *extra_eos_token_ids) if token_id is not None)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._template = None if chat_template is None else _compile_chat_template(chat_template)
        self._text_only: tokenizers.Tokenizer | None = None
        self._added_token_ids = frozenset(backend.get_added_tokens_decoder())

    def __getstate__(self) -> dict[str, Any]:
        # Compiled templates do not pickle; the template text is enough to rebuild one.
        return {name: value for name, value in self.__dict__.items() if name not in ("_template", "_text_only")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._template = None if self.chat_template is None else _compile_chat_template(self.chat_template)
        self._text_only = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying Hugging Face tokenizer (e.g. to `save` it as a tokenizer.json)."""
        return self._backend

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level BPE token may be part of a UTF-8 character);
        an added token's own text; b"" for an id past the vocabulary (the model's padding)."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_token_ids:
            return piece.encode()
        try:
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        except KeyError:  # not a byte-level vocabulary
            return piece.encode()

    def token_text(self, token_id: int) -> str:
        """A token's text on its own (U+FFFD where it holds part of a character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> str | None:
        """BOS as text, e.g. "<|begin_of_text|>"."""
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """EOS as text, e.g. "<|im_end|>"."""
        return self._token_text(self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS in front iff the model wants one."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos_token else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, leaving out special tokens (BOS, EOS, chat markers)."""
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model's chat template writes it, ending with the assistant's cue."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template rejected the conversation: {error}") from error

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered conversation, its content always as text (see the module's
        docstring); BOS is added only if the template did not write it."""
        if any(self._control_tokens.search(m.get("content") or "") for m in messages):
            ids = self._encode_content_as_text(messages)
        else:
            ids = self._backend.encode(self.render_chat(messages), add_special_tokens=False).ids
        if self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    @functools.cached_property
    def _control_tokens(self) -> re.Pattern[str]:
        """Matches any special token's text (a pattern that never matches if there are none)."""
        specials = sorted((t.content for t in self._backend.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials)) or "(?!)")

    def _encode_content_as_text(self, messages: list[dict[str, str]]) -> list[int]:
        """Renders the template around stand-ins for the content, then tokenizes the template's text
        with its control tokens and each message's content with none."""
        marked = [{**m, "content": f"\U000f0000{i}\U000f0001"} for i, m in enumerate(messages)]
        rendered = self.render_chat(marked)
        pieces = _CONTENT_MARK.split(rendered)  # template text, content index, template text, ...
        template_text = "".join(pieces[::2])
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))) or \
                "\U000f0000" in template_text or "\U000f0001" in template_text:
            raise ValueError("a message spells one of the model's control tokens, and this model's chat template "
                             "transforms message content, so it cannot be kept as text; remove the control token")
        if self._text_only is None:
            self._text_only = tokenizers.Tokenizer.from_str(self._backend.to_str())
            self._text_only.encode_special_tokens = True
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2:
                ids += self._text_only.encode(messages[int(piece)].get("content") or "", add_special_tokens=False).ids
            elif piece:
                ids += self._backend.encode(piece, add_special_tokens=False).ids
        return ids

    def incremental_decoder(self) -> IncrementalDecoder:
        """A decoder for one stream of generated tokens."""
        return IncrementalDecoder(self)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)


class IncrementalDecoder:
    """Turns generated tokens into text as they arrive, emitting only text that is final.

    Each push decodes a small window: the tokens already emitted last time (as context, so
    decoders that strip a leading space do so identically) plus the new ones. Text ending in a
    replacement character may be an incomplete multi-byte character, so it is held back until
    the next token completes it or `flush` ends the stream.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._decode = tokenizer.decode
        self._window: list[int] = []
        self._num_emitted = 0  # tokens at the start of the window whose text is already out

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still incomplete."""
        self._window.append(token_id)
        return self._advance(is_final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        return self._advance(is_final=True)

    def _advance(self, is_final: bool) -> str:
        emitted_text = self._decode(self._window[:self._num_emitted])
        text = self._decode(self._window)
        if not is_final and (len(text) <= len(emitted_text) or text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._window = self._window[self._num_emitted:]
        self._num_emitted = len(self._window)
        return text[len(emitted_text):]


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_chat_template(source: str) -> jinja2.Template:
    # The environment transformers' apply_chat_template uses, so templates render identically.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template does not parse: {error}") from error
