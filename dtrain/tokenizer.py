"""A Hugging Face tokenizer folder read without transformers: `tokenizer.json` through the `tokenizers`
library, the special tokens and the chat template from `tokenizer_config.json` (and `config.json`).

Ids are the ones transformers' fast tokenizer (AutoTokenizer) gives for the same folder: both run the same
`tokenizers` pipeline from `tokenizer.json`, its post-processor deciding what `add_special_tokens` adds.
A chat template is untrusted input (it comes with a downloaded folder), so it is rendered in jinja2's
immutable sandbox with the globals transformers gives it (`raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML), and the special tokens as variables.
"""

from __future__ import annotations

import json
import os
from datetime import datetime


class TokenizerError(ValueError):
    """A tokenizer folder or a chat that cannot be used; the one-line message says what to change."""


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts ({"content": ...}).
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


class Tokenizer:
    """encode/decode, the end-of-sequence id, and chat-template rendering of one tokenizer folder."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as _Fast

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(
                f"--tokenizer {folder}: no tokenizer.json there; give a Hugging Face model or tokenizer "
                f"folder saved with a fast tokenizer (tokenizer.json, tokenizer_config.json)"
            )
        try:
            self._tok = _Fast.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a tokenizers file: {str(e).splitlines()[0]}") from None
        self.folder = folder
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        self.config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        self.special = {k: _token_text(self.config.get(k)) for k in self.SPECIAL}
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one, as transformers picks
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.eos_id = self._eos_id()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._compiled = None

    def _eos_id(self) -> int:
        eos = self.special["eos_token"]
        if eos is not None:
            i = self._tok.token_to_id(eos)
            if i is None:
                raise TokenizerError(f"{self.folder}: eos_token {eos!r} is not in tokenizer.json's vocab")
            return i
        model_cfg = os.path.join(self.folder, "config.json")
        if os.path.isfile(model_cfg):
            value = _read_json(model_cfg).get("eos_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
        raise TokenizerError(
            f"{self.folder}: no end-of-sequence token; set eos_token in tokenizer_config.json "
            f"(or eos_token_id in config.json)"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False):
        """(ids, (start, end) character offsets per token)."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _template(self):
        if self._compiled is None:
            if self.chat_template is None:
                raise TokenizerError(
                    f"{self.folder}: tokenizer_config.json has no chat_template; --format chat needs one"
                )
            self._compiled = _compile(self.chat_template)
        return self._compiled

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as transformers' apply_chat_template(tokenize=False) renders it."""
        import jinja2

        variables = {k: v for k, v in self.special.items() if v is not None}
        try:
            return self._template().render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception() of the template, or a bad template
            raise TokenizerError(f"the chat template refuses this conversation: {e}") from None


def _compile(source: str):
    """The template in an immutable sandbox with transformers' globals: a template may call only what
    these give it, and cannot reach Python internals or mutate the data it is handed."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the rendered text
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; here the
        # learned spans are found by rendering prefixes (dtrain.data), so the tag only renders its body.
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse: {e}") from None
