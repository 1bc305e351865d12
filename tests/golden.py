"""Official-format state dicts filled by the golden fill rule (../shared/golden/golden.py's docstring),
and the outputs the authors' code computed for them (tests/data/golden_*.json)."""
import json
import math
import pathlib

import torch

DATA = pathlib.Path(__file__).resolve().parent / "data"


def load_spec(name: str) -> dict:
    return json.loads((DATA / f"golden_{name}.json").read_text())


def _draw(key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """One tensor by the fill rule: randn from the shared generator, scaled by the key's kind."""
    randn = torch.randn(shape, generator=gen)
    if key.endswith("gamma"):
        return 0.1 + 0.05 * randn
    if len(shape) == 1 and "norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * randn
    if "bunch_embedding" in key:
        return 3.0 * randn
    if len(shape) <= 1 or "relative_position_bias_table" in key:
        return 0.05 * randn
    if "router" in key:
        return 4.0 * randn / math.sqrt(shape[-1])
    if "GCN" in key:
        return 0.3 * randn / math.sqrt(shape[0])
    fan_in = math.prod(shape) // shape[0]
    return (0.3 if "out_proj" in key else 1.0) * randn / math.sqrt(fan_in)


def make_state_dict(spec: dict, seed: int) -> dict:
    """Keys in spec order, aliases skipped then copied from their targets."""
    gen = torch.Generator().manual_seed(seed)
    drawn = {key: _draw(key, tuple(shape), gen).float() for key, shape, alias in spec["keys"] if alias is None}
    return {key: drawn[key if alias is None else alias] for key, _, alias in spec["keys"]}


def make_images(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
