"""The input recipe: how a (prompt, response) sample becomes token ids.

Training, evaluation, export and serving all call `SampleEncoder.encode`, so a reward is always computed
on the very same ids. It depends only on `tokenizers` and `jinja2` (no torch), so the server can use it.

Truncation policy for over-long samples (the same everywhere): the prompt is cut from the left (its
oldest tokens go first) and the response is kept whole; when the response alone does not fit, it is cut
at its end but its final token is kept, because decoder reward models read the score there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sample:
    """What is scored: the response given the prompt, each a list of chat messages."""

    prompt: tuple[Message, ...]
    response: tuple[Message, ...]
    steps: tuple[str, ...] | None = None
    """A process reward model's solution given as its steps: the encoder writes the response as each step
    followed by the recipe's `step_token` (`response` is then empty)."""

    @classmethod
    def from_text(cls, prompt: str, response: str) -> Sample:
        return cls((Message("user", prompt),), (Message("assistant", response),))

    @classmethod
    def from_steps(cls, prompt: str, steps: Sequence[str]) -> Sample:
        return cls((Message("user", prompt),), (), tuple(steps))

    @classmethod
    def from_messages(cls, messages: Sequence[Message]) -> Sample:
        """A conversation as one sample: its trailing assistant messages are the response, the rest the prompt.

        The one split rule of the wire's Conversation and of message data in training files, so both encode a
        conversation the same way.
        """
        if not messages:
            raise RecipeError("empty conversation")
        for j, m in enumerate(messages):
            if m.role not in ROLES:
                raise RecipeError(f"message {j} has unknown role {m.role!r}; expected one of {', '.join(ROLES)}")
        split = len(messages)
        while split > 0 and messages[split - 1].role == "assistant":
            split -= 1
        if split == len(messages):
            raise RecipeError("a conversation must end with the assistant message(s) to score")
        return cls(tuple(messages[:split]), tuple(messages[split:]))


@dataclass(frozen=True)
class TextInput:
    """A model input already rendered as one text (a chat-templated string, as veRL sends to vLLM):
    tokenized as it is (`SampleEncoder.encode_text`), then truncated like token ids."""

    text: str
    add_special_tokens: bool | None = None


@dataclass(frozen=True)
class InputRecipe:
    """How samples are turned into ids; stored with the checkpoint and later in the bundle."""

    template: Literal["pair", "concat", "chat", "steps"]
    """`pair`: the tokenizer's own pair template ([CLS] prompt [SEP] response [SEP] for BERT);
    `concat`: prompt and response joined as one string with the tokenizer's single-text special tokens
    (TRL's recipe for text data); `chat`: the conversation rendered with the chat template, tokenized
    without extra special tokens (TRL's and transformers' recipe for conversations); `steps`: a process
    reward model's input as TRL's PRMTrainer builds it: the BOS (`special_tokens["bos_token"]`, where the
    tokenizer has one), the prompt, then each step tokenized on its own and followed by `step_token`."""
    max_length: int
    """Longest id sequence scored; longer samples are truncated by the policy in this module's docstring."""
    append_eos: bool = False
    """`pair` and `concat`: end the response with the EOS token (decoders without a chat template; TRL)."""
    eos_token: str | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None
    """Named special tokens the chat template may use (bos_token, eos_token, ...)."""
    date: str | None = None
    """The day (YYYY-MM-DD) a chat template renders through `strftime_now` (Llama-3's "Today Date: ..."),
    fixed when the recipe is made (rm-train; rm-export for checkpoints trained elsewhere): with the clock,
    a sample's ids and reward would change from day to day, and between training and serving. None (recipes
    written without this field): the current day."""
    step_token: str | None = None
    """The `steps` template's token ending each step (TRL's `"\\n"`, Qwen's `<extra_0>`, `[SEP]` for
    encoders), one token of the vocabulary: each step is scored there. None for every other template."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InputRecipe:
        return cls(**data)


@dataclass(frozen=True)
class EncodedSample:
    ids: list[int]
    truncated: bool
    steps: tuple[int, ...] | None = None
    """Step recipes: the index in `ids` of each step's step token, in order (where its score is read)."""


class RecipeError(ValueError):
    """The recipe cannot encode this sample (unsupported message, template failure, bad max_length)."""


def truncate_prompt_left(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Fit prompt + response into `budget` ids: cut the prompt from the left, then the response's end
    while keeping its final id."""
    if len(prompt) + len(response) <= budget:
        return prompt, response, False
    if len(response) >= budget:
        return [], response[: budget - 1] + response[-1:], True
    return prompt[len(prompt) + len(response) - budget :], response, True


def keep_last_ids(ids: Sequence[int], keep: int, keep_first: bool = False) -> list[int]:
    """Over-long token ids (sent as ids, or a text's ids) cut to `keep`: the last ones (the response; a
    decoder's pooled last token), and with `keep_first` a cls-pooled encoder's pooled first id in the place
    of the oldest of them."""
    head = list(ids[:1]) if keep_first else []
    return head + list(ids[len(ids) - keep + len(head) :])


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict, date: str | None = None
) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, same globals and filters), with
    `strftime_now` reading `date` (YYYY-MM-DD) where given instead of the clock."""
    now = datetime.fromisoformat(date) if date else datetime.now()
    return _compile_chat_template(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        strftime_now=lambda fmt: now.strftime(fmt),
        **special_tokens,
    )


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compiled once per template: compiling costs milliseconds, rendering microseconds (as transformers caches)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def _raise_exception(message: str) -> None:
    raise RecipeError(f"chat template: {message}")


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _flatten(messages: tuple[Message, ...]) -> str:
    """Messages as plain text for the `pair` and `concat` templates: a lone message is its content."""
    if len(messages) == 1:
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


class SampleEncoder:
    """Encodes samples with one tokenizer and one recipe."""

    def __init__(self, tokenizer: Tokenizer, recipe: InputRecipe):
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: no padding or truncation set on it
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.recipe = recipe
        if recipe.template not in ("pair", "concat", "chat", "steps"):
            raise RecipeError(f"unknown recipe template {recipe.template!r}; expected pair, concat, chat or steps")
        if (recipe.template == "steps") != (recipe.step_token is not None):
            raise RecipeError("a recipe has a step_token exactly when its template is 'steps'")
        if recipe.template == "chat" and not recipe.chat_template:
            raise RecipeError("recipe template 'chat' needs a chat_template")
        self._before, self._between, self._after = self._special_ids()
        self._text_before, self._text_after = self._single_text_special_ids()
        self._template_bos = self._template_bos_token()
        self._eos = []
        if recipe.append_eos:
            eos_id = self.tokenizer.token_to_id(recipe.eos_token or "")
            if eos_id is None:
                raise RecipeError(f"eos token {recipe.eos_token!r} is not in the vocabulary")
            self._eos = [eos_id]
        self._budget = recipe.max_length - len(self._before) - len(self._between) - len(self._after)
        if self._budget < 1:
            raise RecipeError(f"max_length {recipe.max_length} leaves no room for a response")
        self.step_id = self._step_token_id() if recipe.step_token is not None else None

    def _step_token_id(self) -> int:
        """The step token's id: it must encode to one token (a whitespace-dropping encoder loses "\\n")."""
        token = self.recipe.step_token or ""
        ids = self._tokenize(token)[0].ids
        if len(ids) != 1:
            raise RecipeError(
                f"step token {token!r} is not one token of this tokenizer (it encodes as {ids}); choose one it "
                "keeps whole, such as [SEP] for an encoder or a special token"
            )
        return ids[0]

    def _special_ids(self) -> tuple[list[int], list[int], list[int]]:
        """The special ids the tokenizer's template puts before, between and after prompt and response."""
        if self.recipe.template == "chat":  # the chat template writes its own special tokens
            return [], [], []
        if self.recipe.template == "steps":
            return self._steps_bos(), [], []
        if self.recipe.template == "concat":
            before, after = self._single_text_special_ids()
            return before, [], after
        a = self.tokenizer.encode("a", add_special_tokens=False)
        b = self.tokenizer.encode("b", add_special_tokens=False)
        ids = self.tokenizer.post_process(a, b, add_special_tokens=True).ids
        ia = ids.index(a.ids[0])
        ib = ids.index(b.ids[0], ia + len(a.ids))
        return ids[:ia], ids[ia + len(a.ids) : ib], ids[ib + len(b.ids) :]

    def _steps_bos(self) -> list[int]:
        """TRL's PRMTrainer starts every input with the tokenizer's BOS where it has one."""
        bos = (self.recipe.special_tokens or {}).get("bos_token")
        bos_id = self.tokenizer.token_to_id(bos) if bos else None
        if bos and bos_id is None:
            raise RecipeError(f"bos token {bos!r} is not in the vocabulary")
        return [bos_id] if bos_id is not None else []

    def _single_text_special_ids(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after one text ([CLS] and [SEP] for BERT)."""
        if self.recipe.template == "steps":  # a rendered input gets what a steps sample gets
            return self._steps_bos(), []
        a = self.tokenizer.encode("a", add_special_tokens=False)
        ids = self.tokenizer.post_process(a, add_special_tokens=True).ids
        if not a.ids or a.ids[0] not in ids:  # a post-processor that rewrites the text: add nothing
            return [], []
        ia = ids.index(a.ids[0])
        return ids[:ia], ids[ia + len(a.ids) :]

    def _template_bos_token(self) -> tuple[str, int] | None:
        """(BOS text, id) where the chat template starts a conversation with BOS (Llama-3, Gemma); None when
        it does not, or when a plain user/assistant exchange cannot be rendered to tell."""
        special = self.recipe.special_tokens or {}
        bos = special.get("bos_token")
        bos_id = self.tokenizer.token_to_id(bos) if bos else None
        if bos_id is None or self.recipe.template != "chat":
            return None
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            rendered = render_chat(self.recipe.chat_template, probe, False, special, self.recipe.date)
        except (RecipeError, jinja2.TemplateError):
            return None
        return (bos, bos_id) if rendered.startswith(bos) else None

    @property
    def vocab_size(self) -> int:
        """Token ids below this (added tokens included) are the model's."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Ids of a model input already rendered as one text (veRL sends chat-templated strings to vLLM's
        /classify), not truncated.

        Unless told (`add_special_tokens`, vLLM's field), the recipe decides the special tokens: for `chat`,
        none beyond what the text holds (the template wrote them), except the template's leading BOS, put
        back once where the text lacks it (veRL strips it because vLLM adds one): a conversation rendered by
        the bundle's template gets the very ids its messages get, with or without its BOS. For `pair` and
        `concat`, the tokenizer's single-text ones (what vLLM adds: [CLS] text [SEP] for BERT), with the
        recipe's EOS before them where it appends one."""
        if add_special_tokens is None and self.recipe.template == "chat":
            bos = self._template_bos
            if bos and not text.startswith(bos[0]):  # tokenized with the BOS, as the template's text is
                text = bos[0] + text
            return list(self._tokenize(text)[0].ids)
        (encoding,) = self._tokenize(text)
        if add_special_tokens is False:
            return list(encoding.ids)
        return self._text_before + encoding.ids + self._eos + self._text_after

    def encode(self, sample: Sample) -> EncodedSample:
        if self.step_id is not None:
            return self._encode_steps(sample)
        if sample.steps is not None:
            raise RecipeError("a sample given as steps needs a process reward model (this one scores sequences)")
        prompt, response = self._prompt_response_ids(sample)
        prompt, response, truncated = truncate_prompt_left(prompt, response + self._eos, self._budget)
        return EncodedSample(self._before + prompt + self._between + response + self._after, truncated)

    def _encode_steps(self, sample: Sample) -> EncodedSample:
        """TRL's PRM input: BOS, the prompt, then each step tokenized on its own and followed by the step token
        (so no step merges with its neighbours). A response given as text is cut into steps at the step
        token, text after the last one being a last step. Only the prompt is ever cut, from the left: steps
        that do not fit are refused, since a cut solution would lose steps."""
        token = self.recipe.step_token or ""
        if sample.steps is not None:
            steps = list(sample.steps)
            if not steps:
                raise RecipeError("no steps: a solution needs at least one")
            for k, step in enumerate(steps):
                if token in step:
                    raise RecipeError(f"step {k} holds the step token {token!r}; send each step without it")
        else:
            pieces = _flatten(sample.response).split(token)
            steps = pieces if pieces[-1] else pieces[:-1]
            if not steps:
                raise RecipeError("the response is empty: no step to score")
        prompt, *step_ids = (e.ids for e in self._tokenize(_flatten(sample.prompt), *steps))
        response, ends = [], []
        for ids in step_ids:
            response += [*ids, self.step_id]
            ends.append(len(response) - 1)
        if len(response) > self._budget:
            raise RecipeError(
                f"the steps take {len(response)} tokens; at most {self._budget} fit the model's maximum of "
                f"{self.recipe.max_length} (only the prompt is cut; send fewer steps)"
            )
        prompt, response, truncated = truncate_prompt_left(list(prompt), response, self._budget)
        start = len(self._before) + len(prompt)
        return EncodedSample(self._before + prompt + response, truncated, tuple(start + k for k in ends))

    def _prompt_response_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        if self.recipe.template == "chat":
            prompt, response = self._chat_ids(sample)
        elif self.recipe.template == "concat":
            prompt_text = _flatten(sample.prompt)
            prompt, response = self._split(prompt_text + _flatten(sample.response), prompt_text)
        else:
            prompt, response = (e.ids for e in self._tokenize(_flatten(sample.prompt), _flatten(sample.response)))
        return list(prompt), list(response)

    def _chat_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        recipe = self.recipe
        special = recipe.special_tokens or {}
        prompt_msgs = [{"role": m.role, "content": m.content} for m in sample.prompt]
        response_msgs = [{"role": m.role, "content": m.content} for m in sample.response]
        full = render_chat(recipe.chat_template, prompt_msgs + response_msgs, False, special, recipe.date)
        prefix = render_chat(recipe.chat_template, prompt_msgs, True, special, recipe.date) if prompt_msgs else ""
        return self._split(full, prefix)

    def _tokenize(self, *texts: str) -> list:
        """Encodings of `texts` without special tokens. Through encode_batch, which releases the GIL while
        it works (encode holds it: a long text froze a server's event loop for as long as it took), and
        gives the same ids and offsets."""
        try:
            return self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # what tokenizers raises for a str it cannot pass to Rust: a lone UTF-16 surrogate
            raise RecipeError("text is not valid Unicode (a lone surrogate such as \\ud800)") from None

    def _split(self, full: str, prefix: str) -> tuple[list[int], list[int]]:
        """Tokenize `full` once (as training did) and split its ids where the text after `prefix` begins."""
        (encoding,) = self._tokenize(full)
        if full.startswith(prefix):
            n_prompt = sum(1 for start, _ in encoding.offsets if start < len(prefix))
        else:  # the template renders the prompt differently once a response follows: split on common ids
            prefix_ids = self._tokenize(prefix)[0].ids
            n_prompt = next((i for i, (x, y) in enumerate(zip(prefix_ids, encoding.ids)) if x != y), len(prefix_ids))
        return encoding.ids[:n_prompt], encoding.ids[n_prompt:]
