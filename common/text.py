"""Text in, token ids out: the tokenizer a package ships, for a V2 ``BYTES`` input.

Uses the ``tokenizers`` library (Rust; no torch, no transformers), so the edge
agent can take text. The package's ``tokenizer.json`` decides the vocabulary;
this module decides the limits: each text must be UTF-8, non-empty, at most
``MAX_TEXT_BYTES`` long (checked before tokenising, so a 10 MB string costs
nothing), and at most ``max_tokens`` tokens (special tokens included) long,
or ``SequenceTooLongError`` says by how much it is over. Rows are padded to
the longest text of the batch, never truncated: a cut text would get a
silently wrong embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInputError, PayloadTooLargeError
from common.inference import Tensor

TEXT_INPUT = "text"  # the V2 BYTES input name apps send
TOKENIZER_FILE = "tokenizer.json"  # the package file, with this manifest role:
TOKENIZER_ROLE = "tokenizer"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
# About 30x what 512 English tokens take: a longer text cannot be a legitimate request.
MAX_TEXT_BYTES = 64 * 1024


class SequenceTooLongError(InvalidInputError):
    """A text (or a token sequence) is longer than this model serves.

    The edge router escalates it to the cloud ("heavy"); where nothing larger
    is left to ask, the caller gets it as a 400.
    """

    def __init__(self, message: str, tokens: int, limit: int) -> None:
        super().__init__(message)
        self.tokens = tokens
        self.limit = limit


class TextEncoder:
    """A loaded ``tokenizer.json`` and the longest sequence the model takes."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer  # lazy: only text models need it

        if max_tokens < 2:
            raise InvalidInputError(f"max_tokens must be at least 2, got {max_tokens}")
        try:
            tokenizer: Any = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type
            raise InvalidInputError(f"cannot load tokenizer {Path(path).name}: {exc}") from exc
        tokenizer.no_truncation()  # a cut text would be a wrong answer: refuse it instead
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens

    def decode_texts(self, data: np.ndarray) -> list[str]:
        """The elements of a BYTES tensor as text; InvalidInputError for any bad element."""
        texts = []
        for i, raw in enumerate(data.reshape(-1)):
            if not isinstance(raw, bytes | bytearray | memoryview):
                raise InvalidInputError(f"text[{i}] is not a string")
            if len(raw) > MAX_TEXT_BYTES:
                raise PayloadTooLargeError(
                    f"text[{i}] is {len(raw)} bytes; at most {MAX_TEXT_BYTES} per text"
                )
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"text[{i}] is not valid UTF-8: {exc.reason}") from None
            if not text.strip():
                raise InvalidInputError(f"text[{i}] is empty")
            texts.append(text)
        return texts

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, data: np.ndarray) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` (INT64 [rows, longest])."""
        if data.ndim != 1 or not data.size:
            raise InvalidInputError(
                f"input {TEXT_INPUT!r} must be a non-empty list of texts [rows], "
                f"got shape {list(data.shape)}"
            )
        texts = self.decode_texts(data)
        encodings = self._tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        longest = max(lengths)
        if longest > self.max_tokens:
            row = lengths.index(longest)
            raise SequenceTooLongError(
                f"text[{row}] is {longest} tokens, {longest - self.max_tokens} over this "
                f"model's limit of {self.max_tokens}",
                longest,
                self.max_tokens,
            )
        ids = np.zeros((len(texts), longest), dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            types[row, :n] = e.type_ids
            mask[row, :n] = 1
        return {INPUT_IDS: ids, ATTENTION_MASK: mask, TOKEN_TYPE_IDS: types}


def has_text_input(request_inputs: list[Tensor]) -> bool:
    return any(t.name == TEXT_INPUT for t in request_inputs)


def text_feeds(
    encoder: TextEncoder | None, inputs: list[Tensor], model_inputs: list[str], model: str
) -> dict[str, np.ndarray]:
    """The model's token tensors for a request that sends ``text`` (and nothing else)."""
    if encoder is None:
        raise InvalidInputError(f"model {model!r} has no tokenizer: it takes no {TEXT_INPUT!r}")
    if len(inputs) != 1:
        raise InvalidInputError(
            f"give either {TEXT_INPUT!r} or the token tensors {model_inputs}, not both"
        )
    tensor = inputs[0]
    if tensor.data.dtype != object:
        raise InvalidInputError(f"input {TEXT_INPUT!r} must be BYTES, got {tensor.datatype}")
    tokens = encoder.encode(tensor.data)
    return {name: tokens[name] for name in model_inputs if name in tokens}


def check_token_feeds(
    feeds: dict[str, np.ndarray], max_tokens: int | None, vocab_size: int | None
) -> None:
    """Token tensors sent as numbers: one shape for all, ids in the vocabulary, not too long."""
    shapes = {tuple(v.shape) for v in feeds.values() if v.ndim >= 2}
    if len(shapes) > 1:
        raise InvalidInputError(f"token tensors must share one shape, got {sorted(shapes)}")
    if max_tokens is not None:
        for name, value in feeds.items():
            if value.ndim >= 2 and value.shape[1] > max_tokens:
                raise SequenceTooLongError(
                    f"input {name!r} holds {value.shape[1]} tokens per row, "
                    f"{value.shape[1] - max_tokens} over this model's limit of {max_tokens}",
                    int(value.shape[1]),
                    max_tokens,
                )
    ids = feeds.get(INPUT_IDS)
    if (
        vocab_size is not None
        and ids is not None
        and ids.size
        and (ids.min() < 0 or ids.max() >= vocab_size)
    ):
        raise InvalidInputError(f"{INPUT_IDS!r} must be token ids in [0, {vocab_size})")
