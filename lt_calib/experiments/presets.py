"""A grid's cells: named presets of (mix, loss) rows and each cell's config.

A grid config holds `base` (a full experiment config), `mixes` and `losses`
(names of MIX_PRESETS / LOSS_PRESETS below, or of the grid's own
`mix_presets` / `loss_presets`), optional `pairs`, and `seeds`.
"""

from typing import Any, Dict, NamedTuple

from lt_calib import config_fields
from lt_calib.errors import ConfigError
from lt_calib.method import mixing

# Loss names of a grid -> config overrides. The one place where a name such
# as 'ldam_drw' is defined; anything not set here comes from `base`.
LOSS_PRESETS: Dict[str, Dict[str, Any]] = {
    "ce": {"loss.name": "ce"},
    "bayias": {"loss.name": "bayias"},
    "logit_adjusted": {"loss.name": "logit_adjusted"},
    "focal": {"loss.name": "focal"},
    "cb_ce": {"loss.name": "class_balanced", "loss.base": "ce"},
    "cb_focal": {"loss.name": "class_balanced", "loss.base": "focal"},
    "cdt": {"loss.name": "cdt"},
    "ldam": {"loss.name": "ldam", "model.head": "normalized"},
    # DRW from `base.loss.drw_epoch` (160 of 200 in the paper protocol; the
    # reduced grids move it with their schedule).
    "ldam_drw": {"loss.name": "ldam", "loss.schedule": "drw", "model.head": "normalized"},
    "ce_drw": {"loss.name": "ce", "loss.schedule": "drw"},
}

# Mix names -> overrides: every mixing method, and the two re-samplers (no
# mixing, class-level main batch).
MIX_PRESETS: Dict[str, Dict[str, Any]] = {
    **{name: {"mix.name": name} for name in mixing.MIX_METHODS},
    "cb_resample": {"mix.name": "none", "sampler.name": "class_balanced"},
    "sqrt_resample": {"mix.name": "none", "sampler.name": "square_root"},
}


class Cell(NamedTuple):
  mix: str
  loss: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.mix}__{self.loss}__seed{self.seed}"


def _has_field(config, dotted: str) -> bool:
  node = config
  for name in dotted.split("."):
    if not hasattr(node, "keys") or name not in node:
      return False
    node = node[name]
  return True


def _grid_presets(grid, field: str, builtin: Dict[str, Dict[str, Any]]) -> dict:
  """The built-in presets plus the grid's own `field` (mix_presets/loss_presets).

  Raises:
    ConfigError: a grid preset that is not (dotted field, value) pairs, names
      a field `grid.base` lacks, or shadows a built-in preset.
  """
  presets = dict(builtin)
  for name, pairs in (grid.get(field) or {}).items():
    if name in builtin:
      raise ConfigError(f"grid.{field}.{name} shadows the built-in preset {name!r}; "
                        "give it another name.")
    overrides = {}
    for pair in pairs:
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not isinstance(pair[0], str)):
        raise ConfigError(f"grid.{field}.{name} must be (dotted field, value) pairs, "
                          f"got {pair!r}; e.g. (('mix.tau_units', 'counts'),).")
      if not _has_field(grid.base, pair[0]):
        raise ConfigError(f"grid.{field}.{name} sets {pair[0]!r}, which grid.base "
                          "does not have; fix the field's name.")
      overrides[pair[0]] = pair[1]
    presets[name] = overrides
  return presets


def grid_pairs(grid) -> list:
  """The (mix, loss) rows of the grid in table order (by loss, as Table 4).

  Raises:
    ConfigError: `grid.pairs` names a mix or loss missing from `grid.mixes` /
      `grid.losses`.
  """
  rows = [(m, l) for l in grid.losses for m in grid.mixes]
  if grid.get("pairs") is None:
    return rows
  wanted = [tuple(pair) for pair in grid.pairs]
  stray = [pair for pair in wanted if pair not in rows]
  if stray:
    raise ConfigError(f"grid.pairs has {stray}, not in grid.mixes x grid.losses; add "
                      "the mix/loss there or drop the pair.")
  return [row for row in rows if row in wanted]


def grid_cells(grid) -> list:
  """Every (mix, loss, seed) of the grid, in table order; checks the names."""
  for kind, names, presets in (
      ("mixes", grid.mixes, _grid_presets(grid, "mix_presets", MIX_PRESETS)),
      ("losses", grid.losses, _grid_presets(grid, "loss_presets", LOSS_PRESETS))):
    unknown = [n for n in names if n not in presets]
    if unknown:
      raise ConfigError(f"grid.{kind} has unknown names {unknown}; allowed: "
                        f"{sorted(presets)}.")
  return [Cell(m, l, int(s)) for m, l in grid_pairs(grid) for s in grid.seeds]


def cell_config(grid, cell: Cell):
  """`grid.base` with the cell's mix, loss and seed applied (a new config)."""
  config = grid.base.copy_and_resolve_references()
  overrides = {**_grid_presets(grid, "mix_presets", MIX_PRESETS)[cell.mix],
               **_grid_presets(grid, "loss_presets", LOSS_PRESETS)[cell.loss],
               "seed": cell.seed}
  return config_fields.set_fields(config, overrides.items())
