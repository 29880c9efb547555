"""The ``perplexity`` evaluator.

Protocol (the numbers are only comparable under the same protocol, so it is recorded with every
metric): the dataset file is tokenized as one stream with the model's tokenizer, no special tokens
added; it is cut into non-overlapping windows of ``seq_len`` tokens and the first ``max_windows``
are kept (all when ``max_windows`` is null); in each window every token but the first is scored
given the tokens before it in that window (``seq_len - 1`` scored tokens per window); perplexity
is ``exp(total negative log-likelihood / scored tokens)``. Windows are run ``batch_size`` at a time.

Sample recipe entry::

    evaluation:
      - evaluator: perplexity
        dataset: data/wikitext-2/test.txt
        seq_len: 512
        max_windows: 40
        batch_size: 4
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from quantmill.plugins.base import EvaluationResult, Evaluator, LoadedModel, Metric, PluginConfig
from quantmill.plugins.calibration.text import tokenize_stream
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.progress import progress_bar


class PerplexityConfig(PluginConfig):
    dataset: Path
    seq_len: int = Field(512, ge=2, le=131_072)
    max_windows: int | None = Field(40, ge=1)
    batch_size: int = Field(4, ge=1, le=1024)


def stream_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of the stream: int64 [num_windows, seq_len]."""
    count = stream.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise QuantmillError(
            f"evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}"
        )
    return stream[: count * seq_len].reshape(count, seq_len)


@torch.inference_mode()
def window_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over the windows, and the scored-token count."""
    device = next(model.parameters()).device
    total, scored = 0.0, 0
    with progress_bar("perplexity", total=windows.shape[0]) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)  # [B, L]
            logits = model(input_ids=batch).logits  # [B, L, V]
            # one window at a time: a float copy of [B, L, V] logits would be B x 100 MB for a
            # 50k vocabulary, and cross_entropy makes another
            for row in range(batch.shape[0]):
                loss = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
                total += float(loss)
                scored += batch.shape[1] - 1
            del logits
            advance(batch.shape[0])
    return total, scored


class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    Config = PerplexityConfig

    def check(self) -> None:
        path = self.config.dataset
        if not path.is_file():
            raise QuantmillError(f"evaluation dataset not found: {path}")
        if path.stat().st_size == 0:
            raise QuantmillError(f"evaluation dataset is empty: {path}")
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise QuantmillError(f"evaluation dataset is not UTF-8 text: {path} ({exc.reason} "
                                 f"at byte {exc.start})") from None
        if path.stat().st_size < self.config.seq_len:
            raise QuantmillError(f"evaluation dataset {path} is shorter than one window of "
                                 f"seq_len={self.config.seq_len} tokens")

    def data_files(self) -> list[Path]:
        return [self.config.dataset]

    def evaluate(self, loaded: LoadedModel, checkpoint_dir: Path | None) -> EvaluationResult:
        self.check()
        c = self.config
        stream = tokenize_stream(loaded.tokenizer, c.dataset.read_text(encoding="utf-8"))
        windows = stream_windows(stream, c.seq_len, c.max_windows)
        loaded.model.eval()
        nll, scored = window_nll(loaded.model, windows, c.batch_size)
        protocol = {
            "dataset": c.dataset.name,
            "seq_len": c.seq_len,
            "windows": int(windows.shape[0]),
            "scored_tokens": scored,
            "stride": c.seq_len,
            "special_tokens": False,
        }
        metrics = [
            Metric("perplexity", math.exp(nll / scored)),
            Metric("nll_per_token", nll / scored, "nats"),
        ]
        return EvaluationResult(self.name, metrics, protocol, c.dataset)


@hookimpl
def register_evaluators() -> list[type[Evaluator]]:
    return [PerplexityEvaluator]
