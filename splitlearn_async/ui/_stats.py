"""What the UI shows for one answer, computed without Gradio: the panel, the privacy boundary, the settings.

:class:`AnswerStats` collects the :class:`~splitlearn_async.client.StepTimings` of each
streamed token and renders the live panel (time per stage, wire bytes, tokens/s, time to
first token) and the privacy boundary (what left the client: hidden-state shapes and
bytes; what stayed: the text, the token ids, the logits). :func:`generation_kwargs` turns
the settings of the UI into the keywords of ``SplitPipeline.generate``.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

from splitlearn_async.errors import ConfigError

__all__ = ["WIRE_DTYPES", "AnswerStats", "GenerationSettings", "generation_kwargs"]

#: The wire dtypes the UI offers: the model's own (exact), or a smaller one.
WIRE_DTYPES = ("model's own (exact)", "float16", "bfloat16")


@dataclass(frozen=True)
class GenerationSettings:
    """The generation settings of the UI, as ``SplitPipeline.generate`` takes them.

    Attributes:
        max_new_tokens: Most new tokens.
        do_sample: Sample (else greedy).
        temperature, top_k, top_p, min_p: Sampling settings (``top_k`` 0 and ``top_p``
            1 turn those filters off; ``min_p`` 0 too).
        repetition_penalty: 1 is off.
        no_repeat_ngram_size: 0 is off.
        seed: The sampler's seed (reproducible sampling), or None.
        wire_dtype: One of :data:`WIRE_DTYPES`.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    wire_dtype: str = WIRE_DTYPES[0]


def generation_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """The keywords of ``SplitPipeline.generate`` for ``settings`` (sampling ones only when sampling).

    Raises:
        ConfigError: a setting is out of range (the message names it).
    """
    s = settings
    if not isinstance(s.max_new_tokens, int) or not 1 <= s.max_new_tokens <= 4096:
        raise ConfigError(f"max new tokens must be 1..4096, got {s.max_new_tokens!r}.")
    if s.wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire dtype must be one of {list(WIRE_DTYPES)}, got {s.wire_dtype!r}.")
    kwargs: dict[str, Any] = {"max_new_tokens": int(s.max_new_tokens), "do_sample": bool(s.do_sample)}
    if s.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = float(s.repetition_penalty)
    if s.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = int(s.no_repeat_ngram_size)
    if s.do_sample:
        kwargs.update(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p))
        if s.min_p:
            kwargs["min_p"] = float(s.min_p)
        if s.seed is not None:
            kwargs["seed"] = int(s.seed)
    return kwargs


@dataclass
class AnswerStats:
    """One answer's figures, as its tokens stream in.

    Args:
        prompt_tokens: Tokens of the prompt (chat template included).
        hidden_size: The model's hidden size ``H``.
        vocab_size: The size of the logits the top makes per token.
        wire_dtype: The dtype hidden states travel in.
        wire_bytes_per_value: Bytes per value of that dtype.
    """

    prompt_tokens: int
    hidden_size: int
    vocab_size: int
    wire_dtype: str
    wire_bytes_per_value: int
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    bottom_ms: list[float] = field(default_factory=list)
    trunk_ms: list[float] = field(default_factory=list)
    top_ms: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    text: str = ""

    def add(self, timings: Any, text: str) -> None:
        """Record one streamed token: its :class:`StepTimings` and its new text."""
        now = time.perf_counter() - self.started
        if self.first_token_s is None:
            self.first_token_s = now
        self.elapsed_s = now
        self.bottom_ms.append(1000 * timings.bottom_s)
        self.trunk_ms.append(1000 * timings.trunk_s)
        self.top_ms.append(1000 * timings.top_s)
        self.bytes_sent += int(timings.bytes_sent)
        self.bytes_received += int(timings.bytes_received)
        self.text += text

    @property
    def tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.trunk_ms)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (0 until there are two)."""
        if self.tokens < 2 or self.first_token_s is None or self.elapsed_s <= self.first_token_s:
            return 0.0
        return (self.tokens - 1) / (self.elapsed_s - self.first_token_s)

    def rows(self) -> list[dict[str, Any]]:
        """Per token and stage, ``{"token", "stage", "ms"}``."""
        out = []
        for stage, values in (("bottom", self.bottom_ms), ("trunk", self.trunk_ms), ("top", self.top_ms)):
            out += [{"token": i + 1, "stage": stage, "ms": round(v, 3)} for i, v in enumerate(values)]
        return out

    def latency_rows(self) -> list[dict[str, Any]]:
        """Per token, ``{"token", "ms"}``: bottom + trunk + top, the data of the latency plot."""
        stages = zip(self.bottom_ms, self.trunk_ms, self.top_ms, strict=True)
        return [{"token": i + 1, "ms": round(b + t + p, 3)} for i, (b, t, p) in enumerate(stages)]

    def panel_html(self) -> str:
        """The live panel: time per stage (total and per token), wire bytes, tokens/s, TTFT."""
        n = max(self.tokens, 1)

        def cell(name: str, values: list[float]) -> str:
            total = sum(values)
            return (
                f"<tr><th>{name}</th><td id='{name}-ms'>{total:.1f}</td><td>{total / n:.2f}</td>"
                f"<td>{(values[-1] if values else 0.0):.2f}</td></tr>"
            )

        ttft = 1000 * self.first_token_s if self.first_token_s is not None else 0.0
        return (
            "<table id='stage-times'><tr><th>stage</th><th>total ms</th><th>ms / token</th><th>last token ms</th></tr>"
            + cell("bottom", self.bottom_ms)
            + cell("trunk", self.trunk_ms)
            + cell("top", self.top_ms)
            + "</table>"
            f"<p><b id='tokens'>{self.tokens}</b> tokens &middot; <b id='tokens-per-s'>{self.tokens_per_s:.1f}</b>"
            f" tokens/s &middot; time to first token <b id='ttft-ms'>{ttft:.0f}</b> ms &middot; wire: "
            f"<b id='bytes-sent'>{self.bytes_sent:,}</b> bytes sent, <b id='bytes-received'>"
            f"{self.bytes_received:,}</b> received</p>"
            "<p><small>trunk = the call as the client waited for it: network, the server's queue and its "
            "compute.</small></p>"
        )

    def privacy_html(self) -> str:
        """What left the client for this answer and what stayed, plainly."""
        h, b = self.hidden_size, self.wire_bytes_per_value
        steps = max(self.tokens - 1, 0)
        left = (
            f"<li>1 hidden-state tensor of shape (1, {self.prompt_tokens}, {h}), {self.wire_dtype}: "
            f"{self.prompt_tokens * h * b:,} bytes of values (the prompt)</li>"
            f"<li>{steps} hidden-state tensor(s) of shape (1, 1, {h}), {self.wire_dtype}: "
            f"{steps * h * b:,} bytes of values (one per generated token)</li>"
            f"<li>on the wire with their framing: {self.bytes_sent:,} bytes sent, "
            f"{self.bytes_received:,} bytes received (the trunk's hidden states back)</li>"
        )
        stayed = (
            f"<li>the text of the conversation and of the answer ({len(self.text):,} characters)</li>"
            f"<li>the token ids: {self.prompt_tokens} prompt tokens, {self.tokens} generated</li>"
            f"<li>the logits: {self.tokens} x {self.vocab_size:,} values, and the choice of each token</li>"
            "<li>the embeddings and the first layers (the bottom), the last layers and the LM head (the top)</li>"
        )
        return (
            "<div id='privacy'><h4>Left this client (sent to the trunk server)</h4><ul id='left'>"
            f"{left}</ul><h4>Stayed on this client</h4><ul id='stayed'>{stayed}</ul>"
            "<p><small>No text and no token id crosses the wire; the hidden states do, and an attacker "
            "who knows the model can read much of the text back from them (README: Privacy at the "
            "cut).</small></p></div>"
        )


def escape(text: str) -> str:
    """``text`` safe inside HTML."""
    return html.escape(text)
