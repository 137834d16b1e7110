"""Setting config fields by dotted name: the one setter configs, grids and tools share.

Light on purpose (no JAX): config files import it.
"""

from lt_calib.errors import ConfigError


def set_fields(config, overrides):
  """Sets each (dotted field, value) of `overrides` on `config`, in place.

  Args:
    config: a ConfigDict.
    overrides: (dotted name, value) pairs, e.g. [("mix.alpha", 0.5)].

  Returns:
    `config`.

  Raises:
    ConfigError: a field the config does not have.
  """
  for dotted, value in overrides:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ConfigError(f"config has no field {dotted!r}; check the override's name.")
    node[leaf] = value
  return config
