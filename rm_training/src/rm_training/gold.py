"""The gold judge: VADER sentiment, a lexicon no model here was trained on.

It labels the demo preference data (the more positive response is `chosen`) and later measures whether PPO
against the learned reward model really improves what the reward model was meant to capture.
"""

from __future__ import annotations

from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """VADER compound sentiment of `text`, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])
