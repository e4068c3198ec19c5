"""Settings declared once: each field of an experiment dataclass carries its
default, help text, choices and config section (`setting`); the scripts'
absl flags and the nested ml_collections configs are generated from the
fields, and the dataclass validates the values, once."""

import dataclasses
import types
import typing
from typing import Any, Iterable, Sequence

from absl import flags
from ml_collections import config_dict

_SAME = object()   # flag_default: the field's default.
# The flags `define_flags` defines belong to its caller (the script): --help
# lists them there.
flags.disclaim_key_flags()


def setting(default: Any, help_text: str, *,
            section: str | None = None,
            choices: Sequence[str] | None = None,
            flag_default: Any = _SAME) -> Any:
  """A dataclass field declaring one setting: its default, the flag's help,
  its `section` of the nested config (None: not in the config), the values
  an enum flag accepts, and `flag_default` where the scripts' flag (and the
  config) default differs from the library's (devices: all of them)."""
  return dataclasses.field(default=default, metadata=dict(
      help=help_text, section=section, choices=choices,
      flag_default=default if flag_default is _SAME else flag_default))


def declared(cls: type) -> list[dataclasses.Field]:
  """The fields of `cls` declared with `setting`."""
  return [f for f in dataclasses.fields(cls) if 'help' in f.metadata]


def kind(field: dataclasses.Field) -> type:
  """str, int, float, bool or tuple: the field's type without None."""
  tp = field.type
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    tp = next(a for a in typing.get_args(tp) if a is not type(None))
  return typing.get_origin(tp) or tp


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS
                 ) -> None:
  """One absl flag per declared field of `cls`, of the field's name; a tuple
  of integers is a comma-separated list."""
  for field in declared(cls):
    meta = field.metadata
    default, help_text = meta['flag_default'], meta['help']
    args = dict(flag_values=flag_values)
    if meta['choices'] is not None:
      flags.DEFINE_enum(field.name, default, list(meta['choices']), help_text,
                        **args)
    elif kind(field) is tuple:
      flags.DEFINE_list(field.name, None if default is None else
                        [str(v) for v in default], help_text, **args)
    else:
      define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, bool: flags.DEFINE_bool}
      define[kind(field)](field.name, default, help_text, **args)


def int_list(flag: str, values: list[str] | None) -> tuple[int, ...] | None:
  """A comma-separated flag's values as integers (None stays None)."""
  if values is None:
    return None
  try:
    return tuple(int(v) for v in values if v.strip())
  except ValueError:
    raise ValueError(f'--{flag}={",".join(values)}: must be a comma-separated '
                     'list of integers') from None


def flag_settings(cls: type, flag_values: flags.FlagValues,
                  only_present: bool = False) -> dict[str, Any]:
  """{field: value} of the flags of `cls`'s declared fields (with
  `only_present`, of the flags given on the command line)."""
  out = {}
  for field in declared(cls):
    flag = flag_values[field.name]
    if only_present and not flag.present:
      continue
    out[field.name] = (int_list(field.name, flag.value)
                       if kind(field) is tuple else flag.value)
  return out


def from_flags(cls: type, flag_values: flags.FlagValues, **fixed) -> Any:
  """`cls` built from the flags of its declared fields' names, and `fixed`
  (--workdir, --overwrite)."""
  return cls(**flag_settings(cls, flag_values), **fixed)


def sections(cls: type) -> dict[str, list[dataclasses.Field]]:
  """{section: its declared fields}, in declaration order."""
  out = {}
  for field in declared(cls):
    if field.metadata['section'] is not None:
      out.setdefault(field.metadata['section'], []).append(field)
  return out


def base_config(cls: type) -> config_dict.ConfigDict:
  """The nested config of `cls`'s settings at their scripts' defaults,
  locked (a misspelt key is an error); a setting whose default is None is a
  typed placeholder, so that `--config.section.name=value` can set it."""
  config = config_dict.ConfigDict()
  for section, fields in sections(cls).items():
    part = config_dict.ConfigDict()
    for field in fields:
      default = field.metadata['flag_default']
      part[field.name] = (config_dict.placeholder(kind(field))
                          if default is None else default)
    config[section] = part
  config.lock()
  return config


def config_paths(cls: type) -> list[str]:
  """`section.name` of every setting in the nested config."""
  return [f'{section}.{f.name}' for section, fields in sections(cls).items()
          for f in fields]


def config_path(cls: type, name: str) -> str:
  """`section.name`: where setting `name` sits in the nested config."""
  field = next(f for f in declared(cls) if f.name == name)
  return f'{field.metadata["section"]}.{name}'


def update(config: config_dict.ConfigDict, cls: type, **values) -> None:
  """Sets settings of `cls` by name in their sections of `config`."""
  for name, value in values.items():
    section, key = config_path(cls, name).split('.')
    config[section][key] = value


def flatten(config: config_dict.ConfigDict, cls: type,
            skip_sections: Iterable[str] = ()) -> dict[str, Any]:
  """{setting: value} of `config` (every section but `skip_sections`); a
  ValueError names the keys of `config` that are no setting of `cls`, and
  the settings it lacks."""
  known, given = set(config_paths(cls)), set()
  for section in config:
    part = config[section]
    given |= ({f'{section}.{key}' for key in part}
              if isinstance(part, config_dict.ConfigDict) else {section})
  if given != known:
    unknown, missing = sorted(given - known), sorted(known - given)
    raise ValueError('; '.join(
        [f'no such setting: {", ".join(unknown)}'] * bool(unknown)
        + [f'missing: {", ".join(missing)}'] * bool(missing)))
  return {f.name: config[section][f.name]
          for section, fields in sections(cls).items()
          if section not in skip_sections for f in fields}


def from_config_and_flags(cls: type, config: config_dict.ConfigDict,
                          flag_values: flags.FlagValues, config_flag: str,
                          **fixed) -> Any:
  """`cls` built from `config` (the value of --CONFIG_FLAG, with its
  --CONFIG_FLAG.SECTION.NAME overrides), the flags of the declared fields'
  names given on the command line replacing its values, and `fixed`; one
  setting given both ways is refused."""
  given = flag_settings(cls, flag_values, only_present=True)
  for name in given:
    path = f'{config_flag}.{config_path(cls, name)}'
    if path in flag_values and flag_values[path].present:
      raise ValueError(f'--{name} and --{path} set the same setting; give '
                       'one')
  try:
    values = flatten(config, cls)
  except ValueError as e:
    raise ValueError(f'--{config_flag}: {e}') from None
  return cls(**{**values, **given, **fixed})
