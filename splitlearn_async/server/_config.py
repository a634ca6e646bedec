"""ServerConfig: the trunk server's limits and options, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitlearn_async.errors import ConfigError

if TYPE_CHECKING:
    from splitlearn_async.wire import DecodeLimits

__all__ = ["ServerConfig"]

_WIRE_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _positive_int(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"ServerConfig.{name} must be an int >= 1, got {value!r}; {fix}.")


def _positive_number(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"ServerConfig.{name} must be a number > 0, got {value!r}; {fix}.")


def _non_negative_seconds(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"ServerConfig.{name} must be a number of seconds >= 0, got {value!r}; {fix}.")


@dataclass(frozen=True)
class ServerConfig:
    """Limits and options of :class:`AsyncGRPCComputeServer`.

    Attributes:
        max_sessions: Most sessions open at once; one more gets ``RESOURCE_EXHAUSTED``.
        max_tokens_total: Token budget over all sessions' KV caches: the sum over sessions
            of (cache columns x batch rows). An open or step that would pass it gets
            ``RESOURCE_EXHAUSTED`` at once.
        max_session_tokens: Most tokens (columns x rows) one session (or one ``Forward``
            call) may hold.
        session_ttl_s: Seconds a session may stay idle before it expires and its cache is freed.
        max_message_bytes: Largest message body, in bytes, either way (gRPC's own default
            of 4 MiB is too small for long prompts).
        wire_dtype: ``None``: replies carry hidden states in the dtype of the request
            (the model's dtype by default, exact). ``"float16"``/``"bfloat16"``/``"float32"``:
            replies always use that dtype.
        torch_threads: torch intra-op threads of the worker; ``None`` leaves torch's default.
        auth_token: If set, every call needs the metadata ``authorization: Bearer <token>``.
        tls_cert_file: PEM certificate chain; with ``tls_key_file`` the server speaks TLS.
        tls_key_file: PEM private key of ``tls_cert_file``.
        metrics_port: If set, serve Prometheus metrics over HTTP on this port (0 = any free port).
        max_batch_size: Most session steps (messages or prefill chunks) the worker runs in one
            batched trunk call.
        max_batch_delay_s: Seconds the worker waits for a batch to fill; 0 batches only the
            steps already waiting.
        batching: False runs every session step alone (for comparisons).
        max_gather_wait_s: When sessions that are in a decode loop (busy, or stepped in the
            last second) have not sent their next step yet, the worker waits up to this
            long for them before it runs a batch, so that steps arriving a few
            milliseconds apart do not split into batches that alternate forever. A lone
            session never waits. 0 turns this off.
        prefill_chunk_tokens: A message with more new tokens than this runs in chunks of
            this many, queued one after another, so other sessions' decode steps run between
            them instead of waiting for the whole prompt; ``None`` never cuts.
        sweep_interval_s: Seconds between sweeps for idle sessions; ``None`` picks
            ``min(1, session_ttl_s / 4)``.
        allow_full_training: Let clients open ``mode="full"`` training sessions, which
            change the served trunk's own weights for every session (LoRA training never
            does). Off by default; such a session is refused with ``FAILED_PRECONDITION``.
        max_training_sessions: Most training sessions open at once (an idle one expires
            after ``session_ttl_s``).
        max_pending_steps: Most training forwards kept waiting for their ``Backward`` (each
            keeps its autograd graph: activations of B x T tokens); one more gets
            ``RESOURCE_EXHAUSTED``.
        pending_step_ttl_s: Seconds a training forward's graph is kept without a
            ``Backward``; then it is freed and its step id answers ``NOT_FOUND``.
        max_adapters: Most LoRA adapters loaded at once.
        max_lora_rank: Largest rank of an adapter, trained (``TrainOpen``) or loaded
            (``LoadAdapter``); checked before anything is allocated.
        max_lora_targets: Most module names in an adapter's ``target_modules``.
        max_adapter_elements: Most elements (``rank x (in + out)`` summed over the adapted
            layers) of one adapter, computed from the trunk's shapes before it is built.
        max_model_bytes: Budget for the weights of the models loaded at once, on a server
            of several models (``splitlearn serve --model NAME=BUNDLE ...``): before a model
            is loaded, idle models are evicted least-recently-used until it fits; ``None``:
            no budget. KV caches are not counted here (see ``max_tokens_total``).
        max_checkpoint_bytes: Most bytes of checkpoints (weights and optimizer state) the
            server holds for transfers at once: one ``TrainOpen``, ``LoadAdapter`` or
            ``TrainSave`` larger than this is refused (``INVALID_ARGUMENT``), and one that
            would pass it together with the transfers in progress (over all models) is
            refused at once with ``RESOURCE_EXHAUSTED``. Checkpoints travel in chunks, so
            this is independent of ``max_message_bytes``. The default (2 GiB) holds
            SmolLM2's whole trunk with its AdamW state (about 1 GB).
        training_segment_layer_tokens: A training forward or backward runs its layers in
            segments of ``max(1, this // (B x T))`` whole layers (B x T: the step's tokens),
            each a work item of its own, so that a decode step arriving meanwhile waits for
            one segment, not for the whole step (the gradients are the same bit for bit);
            when one layer over all B rows is more, in chunks of ``max(1, this // T)`` rows.
            ``None`` runs each forward or backward in one item.
        training_batch_tokens: Training forwards (and evaluations) of different sessions
            with equal ``T`` that wait together run as one batch of at most this many tokens
            (``B x T`` summed, and no more than ``training_segment_layer_tokens`` unless one
            step alone has more), each row with its own session's LoRA adapter; their
            backwards likewise when they wait together. ``None``: each runs alone.
        training_batch_wait_s: How long the backward of a batched forward waits for its
            batch-mates' backwards, to run as one (0: never waits).

    Every request is decoded within limits derived from these fields
    (:attr:`decode_limits`): no ``bin`` longer than ``max_message_bytes``, short strings,
    arrays and maps, and at most a few hundred containers in one message.

    Raises:
        ConfigError: a field is out of range; the message names the value and the fix.
    """

    max_sessions: int = 1024
    max_tokens_total: int = 1_048_576
    max_session_tokens: int = 131_072
    session_ttl_s: float = 300.0
    max_message_bytes: int = 256 * 1024 * 1024
    wire_dtype: str | None = None
    torch_threads: int | None = None
    auth_token: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    metrics_port: int | None = None
    max_batch_size: int = 32
    max_batch_delay_s: float = 0.0
    batching: bool = True
    max_gather_wait_s: float = 0.01
    prefill_chunk_tokens: int | None = 256
    sweep_interval_s: float | None = None
    allow_full_training: bool = False
    max_training_sessions: int = 16
    max_pending_steps: int = 16
    pending_step_ttl_s: float = 60.0
    max_adapters: int = 64
    max_lora_rank: int = 64
    max_lora_targets: int = 16
    max_adapter_elements: int = 16 * 1024 * 1024
    max_model_bytes: int | None = None
    max_checkpoint_bytes: int = 2 * 1024 * 1024 * 1024
    training_segment_layer_tokens: int | None = 64
    training_batch_tokens: int | None = 1024
    training_batch_wait_s: float = 0.05

    def __post_init__(self) -> None:
        _positive_int("max_sessions", self.max_sessions, "allow at least one session, e.g. 1024")
        _positive_int("max_tokens_total", self.max_tokens_total, "give a token budget, e.g. 1048576")
        _positive_int("max_session_tokens", self.max_session_tokens, "e.g. 131072")
        if self.max_session_tokens > self.max_tokens_total:
            raise ConfigError(
                f"ServerConfig.max_session_tokens={self.max_session_tokens} is larger than "
                f"max_tokens_total={self.max_tokens_total}; lower it or raise the total."
            )
        _positive_number("session_ttl_s", self.session_ttl_s, "e.g. 300 seconds")
        _positive_int("max_message_bytes", self.max_message_bytes, "e.g. 268435456 (256 MiB)")
        if self.max_message_bytes >= 2**31:
            raise ConfigError(
                f"ServerConfig.max_message_bytes={self.max_message_bytes} is over gRPC's limit of "
                "2 GiB - 1; use a smaller value."
            )
        if self.wire_dtype is not None and self.wire_dtype not in _WIRE_DTYPE_NAMES:
            raise ConfigError(
                f"ServerConfig.wire_dtype={self.wire_dtype!r} is not supported; use None (the "
                f"request's dtype) or one of {', '.join(_WIRE_DTYPE_NAMES)}."
            )
        if self.torch_threads is not None:
            _positive_int("torch_threads", self.torch_threads, "or None for torch's default")
        if self.auth_token is not None and (not isinstance(self.auth_token, str) or not self.auth_token):
            raise ConfigError("ServerConfig.auth_token must be a non-empty string or None; pass None to turn auth off.")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                "ServerConfig.tls_cert_file and tls_key_file must be given together (got only "
                f"{'tls_cert_file' if self.tls_cert_file else 'tls_key_file'}); pass both or neither."
            )
        if self.metrics_port is not None and (
            isinstance(self.metrics_port, bool)
            or not isinstance(self.metrics_port, int)
            or not 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError(
                f"ServerConfig.metrics_port must be None or a port in 0..65535, got {self.metrics_port!r}."
            )
        _positive_int("max_batch_size", self.max_batch_size, "e.g. 32")
        if (
            isinstance(self.max_batch_delay_s, bool)
            or not isinstance(self.max_batch_delay_s, (int, float))
            or not self.max_batch_delay_s >= 0
        ):
            raise ConfigError(
                f"ServerConfig.max_batch_delay_s must be a number >= 0, got {self.max_batch_delay_s!r}; "
                "0 runs waiting work at once."
            )
        if (
            isinstance(self.max_gather_wait_s, bool)
            or not isinstance(self.max_gather_wait_s, (int, float))
            or not 0 <= self.max_gather_wait_s <= 1
        ):
            raise ConfigError(
                f"ServerConfig.max_gather_wait_s must be a number in [0, 1] seconds, got {self.max_gather_wait_s!r}; "
                "0 turns gathering off, 0.01 is the default."
            )
        if self.prefill_chunk_tokens is not None:
            _positive_int("prefill_chunk_tokens", self.prefill_chunk_tokens, "or None to never cut prompts")
        if self.sweep_interval_s is not None:
            _positive_number("sweep_interval_s", self.sweep_interval_s, "or None for the default")
        if not isinstance(self.allow_full_training, bool):
            raise ConfigError(
                f"ServerConfig.allow_full_training must be True or False, got {self.allow_full_training!r}."
            )
        _positive_int("max_training_sessions", self.max_training_sessions, "e.g. 16")
        _positive_int("max_pending_steps", self.max_pending_steps, "e.g. 16")
        _positive_number("pending_step_ttl_s", self.pending_step_ttl_s, "e.g. 60 seconds")
        _positive_int("max_adapters", self.max_adapters, "e.g. 64")
        _positive_int("max_lora_rank", self.max_lora_rank, "e.g. 64")
        _positive_int("max_lora_targets", self.max_lora_targets, "e.g. 16")
        _positive_int("max_adapter_elements", self.max_adapter_elements, "e.g. 16777216")
        if self.max_model_bytes is not None:
            _positive_int("max_model_bytes", self.max_model_bytes, "e.g. 2147483648 (2 GiB), or None for no budget")
        _positive_int("max_checkpoint_bytes", self.max_checkpoint_bytes, "e.g. 2147483648 (2 GiB)")
        if self.training_segment_layer_tokens is not None:
            _positive_int(
                "training_segment_layer_tokens",
                self.training_segment_layer_tokens,
                "or None to run each training forward or backward in one work item",
            )
        if self.training_batch_tokens is not None:
            _positive_int(
                "training_batch_tokens", self.training_batch_tokens, "or None to run each training forward alone"
            )
        _non_negative_seconds("training_batch_wait_s", self.training_batch_wait_s, "e.g. 0.05, or 0 never to wait")

    @property
    def decode_limits(self) -> DecodeLimits:
        """What one request may hold, derived from this config (see ``wire.unpack``)."""
        from splitlearn_async.wire import DecodeLimits  # here: the config itself stays free of torch

        return DecodeLimits(
            max_str=4096,
            max_bin=self.max_message_bytes,
            max_array=max(64, 2 * self.max_lora_targets),  # room for the caps to answer with their sentence
            max_map=64,
            max_containers=512,
        )

    @property
    def tls(self) -> bool:
        """True when the server speaks TLS."""
        return self.tls_cert_file is not None

    @property
    def effective_sweep_interval_s(self) -> float:
        """Seconds between idle-session sweeps."""
        if self.sweep_interval_s is not None:
            return float(self.sweep_interval_s)
        return min(1.0, self.session_ttl_s / 4)
