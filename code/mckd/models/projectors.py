"""Projectors between student and teacher spaces, built from ``configs/projector_config.json``.

The JSON maps a projector name to ``{"enabled": bool, "structure": str}``. A structure
is a dash-separated chain of sizes and activations:

* a size is ``[coef]{s|t|p}``: ``s`` = student hidden size, ``t`` = teacher hidden size (both
  read from the model configs), ``p`` = an explicit projection size (only when given), ``coef`` an
  optional integer multiplier (``2s`` = twice the student hidden size);
* two consecutive sizes ``a-b`` become ``nn.Linear(a, b)`` (with bias);
* ``relu`` between two sizes inserts ``nn.ReLU`` between the Linear layers: ``s-2s-relu-t`` is
  ``Linear(s, 2s), ReLU, Linear(2s, t)``; a trailing ``relu`` ends with a ReLU.

Deliberate difference: the published parser turned ``s-relu-t`` into ``[ReLU, Linear(s, t)]``, a
ReLU on the raw *input*. No shipped config uses it and it is almost certainly a
mistake, so a ``relu`` right after the input size is an error here.

Only the projectors a criterion asks for are built (the published code built every enabled one,
e.g. the unused ``cproj_*``, and gave them to the optimizer). Warm-starting from a
``projector.pt`` matches parameter names exactly per projector (the published prefix match let
``t`` capture ``t2s.*``) and fails on a shape mismatch instead of skipping silently.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_STRUCTURES: dict[str, str] = {"t2s": "t-s", "s2t": "s-t", "query": "2s-2t", "ot": "t-s",
                                      "dtw_embed": "t-s", "dtw_hidden": "t-s"}
_SIZE = re.compile(r"^(\d*)([stp])$")


def _size(token: str, sizes: Mapping[str, int | None], structure: str) -> int:
    m = _SIZE.match(token)
    if not m:
        raise ValueError(f"projector structure {structure!r}: bad token {token!r} "
                         f"(expected [coef]s, [coef]t, [coef]p or relu)")
    coef = int(m.group(1)) if m.group(1) else 1
    base = sizes.get(m.group(2))
    if base is None:
        raise ValueError(f"projector structure {structure!r}: size {m.group(2)!r} is not known here "
                         f"(s = student hidden, t = teacher hidden, p = --proj-dim when given)")
    return coef * int(base)


def parse_structure(structure: str, sizes: Mapping[str, int | None]) -> nn.Sequential:
    """Build the module a structure string describes.

    Args:
        structure: e.g. ``"t-s"``, ``"2s-2t"``, ``"s-2s-relu-t"``.
        sizes: ``{"s": D_s, "t": D_t, "p": P or None}``.

    Returns:
        ``nn.Sequential`` of Linear/ReLU layers mapping (..., first size) -> (..., last size).
    """
    tokens = [t.strip() for t in structure.split("-") if t.strip()]
    if not tokens or tokens[0] == "relu":
        raise ValueError(f"projector structure {structure!r}: must start with an input size; a ReLU on "
                         f"the raw input (the published 's-relu-t' quirk) is not supported")
    layers: list[nn.Module] = []
    prev = _size(tokens[0], sizes, structure)
    for tok in tokens[1:]:
        if tok == "relu":
            if not layers:
                raise ValueError(f"projector structure {structure!r}: 'relu' right after the input "
                                 f"size would apply a ReLU to the raw input (published quirk); put "
                                 f"it between two Linear layers, e.g. 's-2s-relu-t'")
            layers.append(nn.ReLU())
            continue
        cur = _size(tok, sizes, structure)
        layers.append(nn.Linear(prev, cur))
        prev = cur
    if not any(isinstance(m, nn.Linear) for m in layers):
        raise ValueError(f"projector structure {structure!r}: needs at least two sizes")
    return nn.Sequential(*layers)


def load_projector_config(path: str | os.PathLike | None) -> dict[str, str]:
    """Enabled projector structures by name (:data:`DEFAULT_STRUCTURES` when ``path`` is None)."""
    if path is None:
        return dict(DEFAULT_STRUCTURES)
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--projector-config-path {path}: cannot read projector config: {e}") from e
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "structure" not in entry:
            raise ValueError(f"{path}: entry {name!r} must be {{\"enabled\": bool, \"structure\": str}}")
        if entry.get("enabled", True):
            out[name] = entry["structure"]
    return out


def build_projectors(names: Iterable[str], student_hidden: int, teacher_hidden: int, *,
                     config_path: str | os.PathLike | None = None,
                     proj_dim: int | None = None) -> nn.ModuleDict:
    """Build the named projectors (fp32, PyTorch default init).

    Args:
        names: projectors the criterion uses, e.g. ``("query", "t2s", "s2t")``.
        student_hidden: D_s (from the student config).
        teacher_hidden: D_t (from the teacher config).
        config_path: projector JSON; None = :data:`DEFAULT_STRUCTURES`.
        proj_dim: size of ``p`` in structures, if any uses it.

    Raises:
        ValueError: a requested name is missing or disabled in the config.
    """
    structures = load_projector_config(config_path)
    sizes = {"s": student_hidden, "t": teacher_hidden, "p": proj_dim}
    out = nn.ModuleDict()
    for name in names:
        if name not in structures:
            where = config_path or "the default projector structures"
            raise ValueError(f"projector {name!r} is needed but missing or disabled in {where} "
                             f"(enabled: {', '.join(sorted(structures)) or 'none'})")
        out[name] = parse_structure(structures[name], sizes)
    return out


def load_projector_weights(projectors: nn.ModuleDict, path: str | os.PathLike) -> list[str]:
    """Warm-start projectors from a ``projector.pt`` (a file, or a directory containing one).

    Keys are ``<name>.<param>`` (the published layout) or ``projectors.<name>.<param>`` (our
    criterion state dict); a projector loads only the keys whose first component is exactly its
    name. Projectors absent from the file keep their initialisation (logged).

    Returns:
        Names of the projectors that were loaded.

    Raises:
        FileNotFoundError: no projector.pt at ``path``.
        ValueError: a projector's parameters are incomplete or have the wrong shapes.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "projector.pt"
    if not p.is_file():
        raise FileNotFoundError(f"--projector-path: no projector.pt at {path}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key[len("projectors."):] if key.startswith("projectors.") else key
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    loaded = []
    for name, module in projectors.items():
        if name not in grouped:
            log.info("projector %r not in %s: keeps its initialisation", name, p)
            continue
        own = module.state_dict()
        given = grouped[name]
        if set(own) != set(given):
            raise ValueError(f"{p}: projector {name!r} has parameters {sorted(given)}, expected "
                             f"{sorted(own)} (structure changed?)")
        bad = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
               for k, v in own.items() if tuple(given[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{p}: projector {name!r} shape mismatch ({'; '.join(bad)}); were the "
                             f"projectors trained for other hidden sizes?")
        module.load_state_dict(given)
        loaded.append(name)
    log.info("warm-started projectors %s from %s", loaded, p)
    return loaded


def run_projector(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a projector in its own parameter dtype (inputs may be bf16 hidden states).

    Args:
        module: a projector from :func:`build_projectors`.
        x: (..., D_in).

    Returns:
        (..., D_out) in the projector's dtype.
    """
    dtype = next(module.parameters()).dtype
    return module(x.to(dtype))
