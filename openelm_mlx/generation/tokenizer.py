"""OpenELM's tokenizer: LLaMA SentencePiece with BOS, chat messages encoded with the Instruct template (template.py),
UTF-8-safe streaming.

Apple's repos ship no tokenizer; `find_tokenizer` says exactly how to supply one.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ..errors import CheckpointError, TokenizerNotFoundError
from ..folders.fs import require_regular_file
from ..folders.io import read_json
from .template import EOS_TEXT, JINJA, Message, render_chat

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"  # the Hugging Face `tokenizers` file: all that mlx-lm's save writes
LLAMA_TOKENIZER_REPO = "hf-internal-testing/llama-tokenizer"
LLAMA_VOCAB_SIZE = 32000  # its pieces: Apple's models' vocabulary


def uses_chat_template(folder: Path | None, name: str = "") -> bool:
    """The Instruct decision: recorded in the folder (tokenizer_config.json's chat_template) or,
    failing a record, the model's name says "Instruct"."""
    recorded = _recorded_chat_template(folder) if folder is not None else None
    return recorded if recorded is not None else "instruct" in name.lower()


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes in argv, `\\ud800` in JSON) as U+FFFD: SentencePiece
    takes only valid Unicode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class StreamingDetokenizer:
    """Turns token ids into text pieces as they arrive, never emitting broken UTF-8.

    Byte-fallback pieces (`<0xE2>` ...) are held until their character is complete, and the
    SentencePiece leading space of the very first piece is dropped when `strip_leading_space`.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, strip_leading_space: bool = True):
        self._sp = sp
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading_space
        self.text = ""

    def add_token(self, token: int) -> str:
        """Add one id; return the newly complete text (possibly empty)."""
        sp = self._sp
        if sp.is_control(token):
            return ""
        if sp.is_byte(token):
            data = bytes([int(sp.id_to_piece(token)[3:5], 16)])
        elif sp.is_unknown(token):
            data = " \u2047 ".encode()
        else:
            data = sp.id_to_piece(token).replace("\u2581", " ").encode()
        return self._emit(self._decoder.decode(data, final=False))

    def finalize(self) -> str:
        """Flush what is held (an incomplete byte sequence becomes U+FFFD)."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, piece: str) -> str:
        if self._strip and piece:
            piece, self._strip = piece.removeprefix(" "), False
        self.text += piece
        return piece


class Tokenizer:
    """SentencePiece tokenizer with OpenELM's conventions (unk 0, BOS 1, EOS 2; BOS prepended).

    Args:
        model_file: a SentencePiece `tokenizer.model`.
        chat_template: True to render chat messages with the Instruct template.
    """

    def __init__(self, model_file: str | Path, chat_template: bool = False):
        self.model_file = Path(model_file)
        require_regular_file(self.model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.model_file}: not a SentencePiece model ({str(e)[:100]})") from None
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise CheckpointError(f"{self.model_file}: has no BOS or EOS piece (OpenELM needs both)")
        self.chat_template = chat_template
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for `text`, with BOS first unless `add_bos=False`."""
        ids = self.sp.encode(valid_unicode(text))
        return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, add_bos: bool = True
    ) -> list[int]:
        """Ids of the Instruct prompt: every `</s>` becomes the EOS id, never the text."""
        ids = self.encode_chat_text(render_chat(messages, add_generation_prompt))
        return [self.bos_id, *ids] if add_bos else ids

    def encode_chat_text(self, text: str) -> list[int]:
        """Ids of rendered template text (no BOS): each `</s>` is the EOS id, the rest is encoded as text."""
        ids: list[int] = []
        for i, chunk in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.eos_id)
            if chunk:
                ids.extend(self.sp.encode(valid_unicode(chunk)))
        return ids

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's own text and bytes (a byte-fallback piece is its one byte), e.g. for logprobs."""
        piece = self.sp.id_to_piece(token)
        if self.sp.is_byte(token):
            raw = bytes([int(piece[3:5], 16)])
            return raw.decode("utf-8", errors="backslashreplace"), raw
        text = piece.replace("\u2581", " ")
        return text, text.encode()

    def detokenizer(self, strip_leading_space: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.sp, strip_leading_space)

    file_name = TOKENIZER_FILE  # what `save` writes the tokenizer file as

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.model and a tokenizer_config.json that transformers / mlx-lm read."""
        folder = Path(folder)
        if self.model_file.resolve() != (folder / self.file_name).resolve():
            shutil.copyfile(self.model_file, folder / self.file_name)
        cfg: dict[str, Any] = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            cfg["chat_template"] = JINJA
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class _JsonPieces:
    """The part of SentencePieceProcessor that `Tokenizer` uses, over a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, tok: Any, bos_id: int, eos_id: int, unk_id: int | None):
        self._tok, self._bos, self._eos, self._unk = tok, bos_id, eos_id, unk_id
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special} - {unk_id}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token: int) -> str:
        return self._tok.id_to_token(token)

    def is_byte(self, token: int) -> bool:
        piece = self._tok.id_to_token(token) or ""
        return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")

    def is_control(self, token: int) -> bool:
        return token in self._special

    def is_unknown(self, token: int) -> bool:
        return token == self._unk

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def get_piece_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class JsonTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (what mlx-lm's `save` and `fuse` write) behind the same interface.

    BOS, EOS and unk come from the tokenizer_config.json beside it (LLaMA's <s>, </s>, <unk> by default);
    special tokens written in text are encoded as text, as SentencePiece does.
    """

    file_name = TOKENIZER_JSON

    def __init__(self, json_file: str | Path, chat_template: bool = False):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:  # pragma: no cover - installed with mlx-lm's transformers
            raise CheckpointError(f"{json_file}: reading tokenizer.json needs the `tokenizers` package") from None
        self.model_file = Path(json_file)
        require_regular_file(self.model_file)
        try:
            tok = HFTokenizer.from_file(str(self.model_file))
        except Exception as e:  # tokenizers raises its own Exception type, naming nothing
            raise CheckpointError(f"{self.model_file}: not a Hugging Face tokenizer.json ({str(e)[:100]})") from None
        tok.encode_special_tokens = True
        names = _special_token_names(self.model_file.parent)
        ids = {role: tok.token_to_id(name) for role, name in names.items()}
        if ids["bos"] is None or ids["eos"] is None:
            raise CheckpointError(
                f"{self.model_file}: has no {names['bos']} or {names['eos']} token (OpenELM needs both)"
            )
        self.sp = _JsonPieces(tok, ids["bos"], ids["eos"], ids["unk"])
        self.chat_template = chat_template
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.vocab_size = self.sp.get_piece_size()


def _special_token_names(folder: Path) -> dict[str, str]:
    """BOS/EOS/unk token texts from the folder's tokenizer_config.json (strings or {"content": ...}); LLaMA's by
    default. A config that is not valid JSON is refused."""
    from ..folders.io import read_json

    names = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    if not (folder / "tokenizer_config.json").exists():
        return names
    config = read_json(folder / "tokenizer_config.json")
    for role in names:
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            names[role] = value
    return names


def _tokenizer_file(folder: Path) -> Path | None:
    """The folder's tokenizer.model, else the tokenizer.json that mlx-lm writes, else None."""
    for name in (TOKENIZER_FILE, TOKENIZER_JSON):
        if (folder / name).is_file():
            return folder / name
    return None


def open_tokenizer(path: Path, chat_template: bool) -> Tokenizer:
    """A SentencePiece tokenizer.model, or a Hugging Face tokenizer.json by its name."""
    return JsonTokenizer(path, chat_template) if path.suffix == ".json" else Tokenizer(path, chat_template)


def find_tokenizer(
    model_dir: Path, tokenizer: str | Path | None = None, chat_template: bool | None = None, name: str = ""
) -> Tokenizer:
    """The tokenizer for a model folder: `tokenizer` (a file, folder or Hub repo) or the folder's own.

    `chat_template=None` decides with `uses_chat_template(model_dir, name or model_dir.name)`.

    Raises:
        TokenizerNotFoundError: with the exact ways to supply one.
    """
    model_dir = Path(model_dir)
    if chat_template is None:
        chat_template = uses_chat_template(model_dir, name or model_dir.name)
    if tokenizer is None:
        path = _tokenizer_file(model_dir)
        if path is None:
            raise TokenizerNotFoundError(
                f"{model_dir} has no {TOKENIZER_FILE} (Apple's OpenELM repos ship none). OpenELM uses the LLaMA "
                f"tokenizer: give it as the tokenizer ({LLAMA_TOKENIZER_REPO} from the Hub, or a local "
                f"tokenizer.model), or copy a tokenizer.model into {model_dir}."
            )
        return open_tokenizer(path, chat_template)
    path = Path(tokenizer)
    if path.is_dir():
        path = _tokenizer_file(path) or path / TOKENIZER_FILE
        if not path.exists():  # the user named this folder: no advice about other tokenizers fits
            raise CheckpointError(
                f"{tokenizer}: folder has no {TOKENIZER_FILE} (give the file, or a folder holding it)"
            )
    elif not path.exists():
        path = _download_tokenizer(str(tokenizer))
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer file not found")
    return open_tokenizer(path, chat_template)  # refuses FIFOs and other special files, naming them


def _recorded_chat_template(model_dir: Path) -> bool | None:
    """True/False when the folder's tokenizer_config.json says, None when the folder has none.

    Raises:
        CheckpointError: naming the file when it is unreadable, not a JSON object, or its chat_template is
            neither a string nor a list (transformers' named templates).
    """
    path = model_dir / "tokenizer_config.json"
    if not os.path.lexists(path):
        return None
    template = read_json(path).get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise CheckpointError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return bool(template)


def _download_tokenizer(repo_id: str) -> Path:
    from ..folders.hub import download

    return download(repo_id, [TOKENIZER_FILE]) / TOKENIZER_FILE
