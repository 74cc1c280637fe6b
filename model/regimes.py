"""Seeded synthetic regime-switching series: a sequence benchmark whose ground truth is known.

Each series switches between a few regimes at random times (a semi-Markov chain with
geometric durations). A regime fixes the dynamics of the log-value: mean level, AR(1)
persistence, a seasonal cycle, noise and volume-like bursts. The regime is not a column the
model reads: it shows only through recent history (level, step size, local range), which is
what a per-step gate can see. The true regime is kept so that routing can be scored against
it (normalised mutual information between routed expert and regime).

Output is kanmoe's long format: ``time, series, value, abs_change, range, regime``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

FEATURES = ["value", "abs_change", "range"]
BURST_CAP = 1.0  # log units: a burst at most e^1 = 2.7x, so one spike cannot squash MinMax


@dataclass(frozen=True)
class Regime:
    """Dynamics of log(value) while the regime holds."""

    level: float  # mean of log(value)
    phi: float  # AR(1) coefficient of the deviation from the level
    period: int  # seasonal period in steps (0 = none)
    amplitude: float  # seasonal amplitude in log units
    noise: float  # innovation std in log units
    burst_prob: float  # chance per step of a burst (a short multiplicative spike)


# Three regimes that differ in every visible respect: a calm trending regime, a seasonal
# one and a bursty one. Levels differ so that a single step already carries information.
DEFAULT_REGIMES: tuple[Regime, ...] = (
    Regime(level=0.0, phi=0.95, period=0, amplitude=0.0, noise=0.05, burst_prob=0.0),
    Regime(level=0.8, phi=0.5, period=12, amplitude=0.4, noise=0.08, burst_prob=0.0),
    Regime(level=1.6, phi=0.2, period=0, amplitude=0.0, noise=0.25, burst_prob=0.08),
)


def regime_path(n_steps: int, n_regimes: int, mean_duration: float, rng) -> np.ndarray:
    """Regime index per step: geometric durations (>= 10 steps), next regime != current."""
    out = np.empty(n_steps, dtype=np.int64)
    t, current = 0, int(rng.integers(n_regimes))
    while t < n_steps:
        length = 10 + int(rng.geometric(1.0 / max(1.0, mean_duration - 10)))
        out[t : t + length] = current
        t += length
        others = [r for r in range(n_regimes) if r != current]
        current = int(rng.choice(others)) if others else current
    return out


def simulate_series(regimes_at: np.ndarray, regimes: tuple[Regime, ...], rng) -> np.ndarray:
    """Positive values whose log follows the active regime's dynamics step by step."""
    n = len(regimes_at)
    log_v = np.empty(n)
    dev, burst = 0.0, 0.0
    for t in range(n):
        r = regimes[regimes_at[t]]
        dev = r.phi * dev + r.noise * rng.standard_normal()
        spike = rng.exponential(0.5) if rng.random() < r.burst_prob else 0.0
        burst = min(BURST_CAP, 0.5 * burst + spike)
        season = r.amplitude * np.sin(2 * np.pi * t / r.period) if r.period else 0.0
        log_v[t] = r.level + dev + season + burst
    return np.exp(log_v)


def generate(
    n_series: int = 3,
    n_steps: int = 1500,
    seed: int = 0,
    regimes: tuple[Regime, ...] = DEFAULT_REGIMES,
    mean_duration: float = 120.0,
    range_steps: int = 5,
) -> pd.DataFrame:
    """Long-format frame of ``n_series`` series of ``n_steps`` steps; same seed, same frame.

    ``abs_change`` = |log v_t - log v_{t-1}| and ``range`` = max - min of log v over the last
    ``range_steps`` steps (both causal: only the past and present).
    """
    if n_series < 1 or n_steps < 2 or not regimes:
        raise ValueError("need n_series >= 1, n_steps >= 2 and at least one regime")
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_series):
        regime = regime_path(n_steps, len(regimes), mean_duration, rng)
        value = simulate_series(regime, regimes, rng)
        log_v = pd.Series(np.log(value))
        frames.append(
            pd.DataFrame(
                {
                    "time": np.arange(n_steps),
                    "series": f"s{s}",
                    "value": value,
                    "abs_change": log_v.diff().abs().fillna(0.0).to_numpy(),
                    "range": (
                        log_v.rolling(range_steps, min_periods=1).max()
                        - log_v.rolling(range_steps, min_periods=1).min()
                    ).to_numpy(),
                    "regime": regime,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def write_csv(path, **kwargs) -> pd.DataFrame:
    """``generate(**kwargs)`` written to ``path``; returns the frame."""
    frame = generate(**kwargs)
    frame.to_csv(path, index=False, float_format="%.9g")
    return frame
