"""Ready-made experts for :class:`kanmoe.model.moe.MoE`: recurrent, MLP and KAN.

Any ``nn.Module`` can be an expert; these helpers cover the paper's setups (GRU/LSTM on
sequences, MLP and KAN on tables) and expose ``in_features`` / ``out_features`` so the MoE
can size its gate without being told.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kanmoe.model.gates import make_activation
from torch import Tensor, nn

RNN_CELLS = ("gru", "lstm")


class RNNExpert(nn.Module):
    """GRU or LSTM over ``(B, T, input_size)`` (batch first).

    Returns the full output sequence ``(B, T, hidden_size)`` when ``return_sequences`` is
    true (Keras ``return_sequences=True``), else the last step's output ``(B, hidden_size)``.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        return_sequences: bool = False,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cell = cell.lower() if isinstance(cell, str) else cell
        if cell not in RNN_CELLS:
            raise ValueError(f"cell={cell!r} is not one of {RNN_CELLS}")
        for argument, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{argument} must be a positive int, got {value!r}")
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.cell = cell
        self.in_features = input_size
        self.out_features = hidden_size
        self.return_sequences = return_sequences

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return out if self.return_sequences else out[:, -1]

    def extra_repr(self) -> str:
        return f"return_sequences={self.return_sequences}"


class MLPExpert(nn.Module):
    """``Linear + activation`` per hidden width, then an optional linear output layer.

    ``(..., in_features) -> (..., out_features)``; with ``out_features=None`` the output is
    the last hidden layer after its activation, so ``MLPExpert(10, hidden=(100,))`` is
    Keras ``Dense(100, activation="relu")``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64,),
        out_features: int | None = None,
        activation: str | nn.Module = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        if any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(
                f"in_features and hidden must be positive ints, got {in_features!r}, {hidden!r}"
            )
        if out_features is None and not hidden:
            raise ValueError("give out_features or at least one hidden width")
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        if out_features is not None:
            layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features if out_features is not None else widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class KANExpert(nn.Module):
    """A :class:`kanmoe.model.layers.KAN` stack ``widths[0] -> ... -> widths[-1]``.

    ``kan_kwargs`` go to every ``KANLinear`` (``basis``, ``grid_size``, ...).
    """

    def __init__(self, widths: Sequence[int], **kan_kwargs: Any) -> None:
        super().__init__()
        from kanmoe.model.layers import KAN

        widths = list(widths)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must list at least two positive ints, got {widths!r}")
        self.kan = KAN(widths, **kan_kwargs)
        self.in_features = widths[0]
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.kan(x)
