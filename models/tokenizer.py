"""Tokenizers of a checkpoint directory: `tokenizer.json`, or `tokenizer.model` in sentencepiece or tiktoken format.

All three behave like the `transformers` tokenizer of the same files: special tokens written in the text are
matched as special tokens, `encode` adds the BOS token the way the checkpoint asks, and chat templates from
`tokenizer_config.json` (or `chat_template.jinja`) are rendered with jinja2 in a sandbox.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from longctx.models.config import read_json

# Meta's Llama 3 release: split pattern and special tokens (ids follow the base vocabulary in this order).
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]  # fmt: skip
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _token_text(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one checkpoint."""

    def __init__(self, special: dict[str, int], config: dict[str, Any], chat_template: str | None):
        self.special = special  # special token text -> id
        self.special_ids = set(special.values())
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))

    # --- what each format implements
    def _encode_plain(self, text: str, first: bool) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int], first: bool) -> str:
        raise NotImplementedError

    def _add_special(self, ids: list[int]) -> list[int]:
        bos = self.config.get("add_bos_token", True) and self.bos_id is not None
        eos = self.config.get("add_eos_token", False) and self.eos_id is not None
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    # --- shared behaviour
    @property
    def bos_id(self) -> int | None:
        return self.special.get(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.special.get(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        if self.special:
            pattern = "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True))
            pieces = re.split(f"({pattern})", text)
        else:
            pieces = [text]
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.special[piece])
            elif piece:
                ids.extend(self._encode_plain(piece, first=i == 0))
        return self._add_special(ids) if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        by_id = {i: s for s, i in self.special.items()}
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self._decode_plain(run, first=not out))
                    run = []
                if not skip_special_tokens:
                    out.append(by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_plain(run, first=not out))
        return "".join(out)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass a plain prompt instead of messages")
        return _render(self.chat_template, self.config, messages, add_generation_prompt, **kwargs)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat; like transformers, the template itself supplies any BOS."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object; got {type(config).__name__}")
        template, source = config.get("chat_template"), config_file
        if (path / "chat_template.jinja").is_file():
            template, source = (path / "chat_template.jinja").read_text(encoding="utf-8"), path / "chat_template.jinja"
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None:
            _check_template(template, source)
        if (path / "tokenizer.json").is_file():
            tok = _opened(HFTokenizer, path / "tokenizer.json", config, template)
        elif (model_file := path / "tokenizer.model").is_file():
            if _is_tiktoken_file(model_file):
                tok = _opened(TiktokenTokenizer, model_file, config, template or LLAMA3_CHAT_TEMPLATE)
            else:
                tok = _opened(SentencePieceTokenizer, model_file, config, template)
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")
        if template is not None:  # a template that parses may still fail on a message: try one now, not mid-run
            try:
                tok.apply_chat_template([{"role": "user", "content": "Hello"}])
            except Exception as e:  # jinja2 raises assorted types; the template's raise_exception, ValueError
                raise ValueError(
                    f"{source}: the chat template fails on a user message ({type(e).__name__}: {e})"
                ) from None
        return tok


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; its post-processor decides BOS/EOS."""

    def __init__(self, file: Path, config: dict[str, Any], chat_template: str | None):
        from tokenizers import Tokenizer as TK

        self.tk = TK.from_file(str(file))
        special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        super().__init__(special, config, chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece tokenizer.model (Llama 2, Mistral, Gemma)."""

    def __init__(self, file: Path, config: dict[str, Any], chat_template: str | None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(file))
        # Whether the model puts a "▁" in front of the text (Llama 2, Mistral) or not (Gemma).
        self._dummy_prefix = self.sp.encode_as_pieces("a")[0].startswith("▁")
        special = {
            self.sp.id_to_piece(i): i
            for i in range(self.sp.get_piece_size())
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        for tok in (config.get("added_tokens_decoder") or {}).values():
            if tok.get("special"):
                special.setdefault(tok["content"], self.sp.piece_to_id(tok["content"]))
        config = {
            "bos_token": self.sp.id_to_piece(self.sp.bos_id()),
            "eos_token": self.sp.id_to_piece(self.sp.eos_id()),
        } | config
        super().__init__(special, config, chat_template)
        self._unk = self.sp.id_to_piece(self.sp.unk_id())
        self._unk_len = len(self.sp.encode(self._unk))

    def _encode_plain(self, text: str, first: bool) -> list[int]:
        # As transformers does: only text at the very start gets the "▁" prefix, and only if it has no leading
        # space already. Otherwise encode behind the unknown token, which takes the prefix, and drop it.
        if not self._dummy_prefix or (first and not text.startswith(" ")):
            return self.sp.encode(text)
        return self.sp.encode(self._unk + text)[self._unk_len :]

    def _decode_plain(self, ids: list[int], first: bool) -> str:
        text = self.sp.decode(ids)  # with a dummy prefix, drops the leading "▁" of the first piece
        if first or not self._dummy_prefix or not self.sp.id_to_piece(ids[0]).startswith("▁"):
            return text
        return " " + text


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer.model: base64 byte sequences with their BPE ranks."""

    def __init__(self, file: Path, config: dict[str, Any], chat_template: str | None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(file))
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(file.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"} | config
        super().__init__(special, config, chat_template)

    def _encode_plain(self, text: str, first: bool) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_plain(self, ids: list[int], first: bool) -> str:
        return self.enc.decode(ids)

    def _add_special(self, ids: list[int]) -> list[int]:
        return [self.bos_id, *ids]


def _is_tiktoken_file(file: Path) -> bool:
    """tiktoken files are text lines `<base64> <rank>`; sentencepiece models are binary protobuf."""
    with open(file, "rb") as f:
        line = f.readline(256).split()
    return len(line) == 2 and line[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", line[0]) is not None


def _opened(cls: type, file: Path, config: dict[str, Any], template: str | None) -> "Tokenizer":
    """The tokenizer `cls` reads from `file`; a library's failure to read it names the file."""
    try:
        return cls(file, config, template)
    except Exception as e:  # tokenizers, sentencepiece and tiktoken each raise their own types
        raise ValueError(
            f"{file} cannot be read as a tokenizer ({type(e).__name__}: {e}); re-download or re-convert it"
        ) from None


def _check_template(template: str, source: Path) -> None:
    from jinja2 import TemplateSyntaxError

    try:
        _environment().parse(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"{source}: the chat template does not parse (line {e.lineno}: {e.message})") from None


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])


def _render(template: str, config: dict[str, Any], messages, add_generation_prompt: bool, **kwargs: Any) -> str:

    def raise_exception(message: str):
        raise ValueError(f"chat template error: {message}")

    env = _environment()
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **kwargs
    )
