"""Activation modules by name, shared by KAN layers, gates, experts and the config builder."""

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(activation: str | nn.Module, argument: str = "activation") -> nn.Module:
    """A fresh activation module from a name, or the given module itself.

    ``argument`` names the caller's parameter so a bad value gives a ValueError naming it.
    """
    if isinstance(activation, nn.Module):
        return activation
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(
            f"{argument}={activation!r} is not one of {tuple(ACTIVATIONS)} or an nn.Module"
        )
    return ACTIVATIONS[activation.lower()]()
