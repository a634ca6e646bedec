"""The Gradio app of ``splitlearn ui``: a chat through bottom -> trunk -> top, its live panel, and a training tab.

Gradio is imported here only (``pip install splitlearn-async[ui]``); the work is
:class:`~._backend.UIBackend`'s and the figures :class:`~._stats.AnswerStats`'.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from ._backend import TrainProgress, UIBackend
from ._stats import WIRE_DTYPES, AnswerStats, GenerationSettings, escape

__all__ = ["build_app"]

_INTRO = """# splitlearn-async: split inference, watched
Your messages are tokenized, embedded and run through the **bottom** layers here, in this
process. Only hidden states go to the **trunk** server; its output comes back and the **top**
layers and the LM head, here again, pick each token. The panel shows where each token's time
went and what crossed the wire."""


def _plot_rows(stats: AnswerStats | None) -> Any:
    import pandas as pd

    rows = stats.latency_rows() if stats is not None else []
    return pd.DataFrame(rows or {"token": pd.Series([], dtype="int64"), "ms": pd.Series([], dtype="float64")})


def _loss_rows(progress: TrainProgress) -> Any:
    import pandas as pd

    return pd.DataFrame({"step": list(range(1, len(progress.losses) + 1)), "loss": progress.losses})


def build_app(backend: UIBackend) -> Any:
    """The ``gradio.Blocks`` of the UI, wired to ``backend`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    import gradio as gr

    with gr.Blocks(title="splitlearn-async") as app:
        gr.Markdown(_INTRO)
        if backend.status_url:
            gr.Markdown(f"Trunk server: `{backend.address}` · [status page]({backend.status_url})")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.Chatbot(label="conversation", elem_id="chat", height=360)
                    message = gr.Textbox(label="message", placeholder="Ask something...", elem_id="message")
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    answer_raw = gr.Textbox(
                        label="the answer's text, as generated", elem_id="answer-raw", interactive=False, lines=2
                    )
                with gr.Column(scale=2):
                    panel = gr.HTML("<p>Send a message to see where its time goes.</p>", elem_id="panel")
                    plot = gr.LinePlot(
                        _plot_rows(None),
                        x="token",
                        y="ms",
                        title="per-token latency: bottom + trunk + top (ms)",
                        elem_id="latency-plot",
                        height=220,
                    )
                    privacy = gr.HTML("", elem_id="privacy-panel")
            with gr.Accordion("Generation settings", open=False):
                with gr.Row():
                    max_new_tokens = gr.Slider(
                        1, 512, value=64, step=1, label="max new tokens", elem_id="max-new-tokens"
                    )
                    wire_dtype = gr.Dropdown(list(WIRE_DTYPES), value=WIRE_DTYPES[0], label="wire dtype")
                    do_sample = gr.Checkbox(False, label="sample (else greedy)")
                    seed = gr.Number(None, label="seed (sampling)", precision=0)
                with gr.Row():
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                    top_k = gr.Slider(0, 200, value=50, step=1, label="top-k (0: off)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                    min_p = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="min-p (0: off)")
                with gr.Row():
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="repetition penalty")
                    no_repeat = gr.Slider(0, 8, value=0, step=1, label="no-repeat n-gram size")
            settings = [
                max_new_tokens,
                do_sample,
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                no_repeat,
                seed,
                wire_dtype,
            ]

            async def respond(text: str, history: list[dict[str, Any]], *values: Any) -> AsyncIterator[tuple[Any, ...]]:
                (max_new, sample, temp, k, p, mp, rep, ngram, seed_value, wire) = values
                s = GenerationSettings(
                    max_new_tokens=int(max_new),
                    do_sample=bool(sample),
                    temperature=float(temp),
                    top_k=int(k),
                    top_p=float(p),
                    min_p=float(mp),
                    repetition_penalty=float(rep),
                    no_repeat_ngram_size=int(ngram),
                    seed=None if seed_value is None else int(seed_value),
                    wire_dtype=str(wire),
                )
                history = [*(history or []), {"role": "user", "content": text}]
                messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in history]
                try:
                    async for stats in backend.answer(messages, s):
                        shown = [*history, {"role": "assistant", "content": stats.text}]
                        yield shown, "", stats.text, stats.panel_html(), _plot_rows(stats), stats.privacy_html()
                except Exception as exc:  # shown in the UI, with the library's sentence
                    raise gr.Error(str(exc)) from exc

            outputs = [chat, message, answer_raw, panel, plot, privacy]
            send.click(respond, [message, chat, *settings], outputs)
            message.submit(respond, [message, chat, *settings], outputs)
        with gr.Tab("Training"):
            gr.Markdown(
                "A few LoRA steps on the trunk (rank 8 on q/k/v/o), on the shipped text (*Alice's Adventures in "
                "Wonderland*, chapter 1). The client computes the loss; the trunk's adapter trains on the server; "
                "the tokens never leave this process."
            )
            with gr.Row():
                steps = gr.Slider(1, 60, value=10, step=1, label="steps", elem_id="train-steps")
                lr = gr.Slider(1e-4, 5e-3, value=1e-3, step=1e-4, label="learning rate")
                probe = gr.Textbox("Who did Alice follow down the rabbit hole?", label="probe question")
            train = gr.Button("Train", variant="primary", elem_id="train")
            losses = gr.LinePlot(
                _loss_rows(TrainProgress()), x="step", y="loss", title="training loss", elem_id="loss-plot", height=240
            )
            summary = gr.HTML("", elem_id="train-summary")
            with gr.Row():
                before = gr.Textbox(label="answer before (base weights)", interactive=False, elem_id="answer-before")
                after = gr.Textbox(
                    label="answer after (with the trained adapter)", interactive=False, elem_id="answer-after"
                )

            async def run_training(n: float, rate: float, question: str) -> AsyncIterator[tuple[Any, ...]]:
                try:
                    async for progress in backend.train(int(n), question, lr=float(rate)):
                        after_loss = "" if progress.held_out_after is None else f"{progress.held_out_after:.3f}"
                        text = (
                            f"<p>adapter <code>{escape(progress.adapter_id)}</code> · step {len(progress.losses)}"
                            f" of {int(n)} · held-out loss before <b>{progress.held_out_before:.3f}</b>"
                            f"{', after <b id=held-out-after>' + after_loss + '</b>' if after_loss else ''}</p>"
                        )
                        yield _loss_rows(progress), text, progress.answer_before, progress.answer_after or ""
                except Exception as exc:
                    raise gr.Error(str(exc)) from exc

            train.click(run_training, [steps, lr, probe], [losses, summary, before, after])
    return app


def _text_of(content: Any) -> str:
    """A chat message's text (Gradio may give a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)
