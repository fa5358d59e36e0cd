"""Quantisation recipes: which bits, granularities and search grids a calibration uses."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Tuple

from .._errors import InputError

# Layer groups a recipe can quantise (the inputs of each quantised layer are quantised too).
LAYER_GROUPS = ("conv", "linear", "attention")


@dataclass(frozen=True)
class QuantRecipe:
    """Settings of a simulated post-training quantisation.

    Arguments:
      name (str): short name, recorded in saved files.
      weight_bits (int): bits of every weight; symmetric, per output channel, integer range
        [-2**(b-1), 2**(b-1)-1].
      act_bits (int): bits of every quantised activation; per tensor. Plain activations are
        asymmetric (unsigned range [0, 2**b-1] with a zero point); post-softmax and post-GELU
        activations use twin uniform ranges (one bit picks the range, b-1 bits the code).
      weight_search (tuple of float): clipping ratios tried for each output channel's max |w|.
      act_search (tuple of float): clipping ratios tried for each activation's observed range
        (for twin uniform post-GELU inputs: of the positive range's maximum).
      softmax_fine_shifts (tuple of int): exponents m tried for post-softmax, fine step = coarse / 2**m.
      layers (tuple of str): groups quantised, from LAYER_GROUPS. "attention" quantises the inputs
        of both attention matrix products (q, k, the softmax output and v).
      max_search_rows (int): calibration rows (tokens, or pixels for convolutions) kept per layer
        for the search; bounds memory and time at full resolution.
    """

    name: str
    weight_bits: int = 8
    act_bits: int = 8
    weight_search: Tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
    act_search: Tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    softmax_fine_shifts: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    layers: Tuple[str, ...] = LAYER_GROUPS
    max_search_rows: int = 4096

    def __post_init__(self):
        for field in ("weight_bits", "act_bits"):
            bits = getattr(self, field)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise InputError(f"QuantRecipe.{field} must be an int in 2..8 (int8 storage), got {bits!r}")
        for field in ("weight_search", "act_search"):
            grid = getattr(self, field)
            if not grid or any(not 0.0 < float(r) <= 1.0 for r in grid):
                raise InputError(f"QuantRecipe.{field} must be a non-empty tuple of ratios in (0, 1], got {grid!r}")
        unknown = set(self.layers) - set(LAYER_GROUPS)
        if unknown:
            raise InputError(f"QuantRecipe.layers has unknown groups {sorted(unknown)}; choose from {LAYER_GROUPS}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantRecipe":
        data = json.loads(text)
        for key in ("weight_search", "act_search", "softmax_fine_shifts", "layers"):
            data[key] = tuple(data[key])
        return cls(**data)


W8A8 = QuantRecipe("w8a8", weight_bits=8, act_bits=8)
W6A6 = QuantRecipe("w6a6", weight_bits=6, act_bits=6)
RECIPES = {"w8a8": W8A8, "w6a6": W6A6}


def get_recipe(recipe) -> QuantRecipe:
    """A QuantRecipe, or the name of one in RECIPES."""
    if isinstance(recipe, QuantRecipe):
        return recipe
    if recipe in RECIPES:
        return RECIPES[recipe]
    raise InputError(f"unknown quantisation recipe {recipe!r}; pass a QuantRecipe or one of {sorted(RECIPES)}")
