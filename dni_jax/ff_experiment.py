"""The feed-forward experiment: every setting of `scripts/train_ff.py`,
declared once (default, help, config section), validated once, and its
nested ml_collections config (`base_config`)."""

import dataclasses
import functools
import re
from typing import Any

from ml_collections import config_dict

from dni_jax import data
from dni_jax import feedforward
from dni_jax import parallel
from dni_jax import pipeline as pipeline_lib
from dni_jax import settings
from dni_jax import training

_S = settings.setting

# Values no feed-forward run can mean (the paper's networks have up to 6
# layers of up to 1000 units, synthetic-gradient models of up to 4000): far
# above them, a typo would only grow memory and compile time for minutes.
LIMITS = {
    'num_layers': (100, 'each layer is compiled on its own; the paper uses '
                   'up to 6'),
    'hidden_size': (16384, 'the paper uses up to 1000 units'),
    'sg_hidden_size': (16384, 'the paper uses up to 4000 units'),
    'batch_size': (65536, 'the paper uses 256'),
}
# The config's sections that describe where a run executes, not the run.
RUNTIME = 'runtime'
DATA_SOURCES = ('files', 'tfds')
PIPELINES = ('', 'dni', 'bprop')
PIPELINE_PROGRAMS = ('one', 'per_stage')


@dataclasses.dataclass(frozen=True)
class FeedForwardExperiment:
  """Everything `scripts/train_ff.py` sets; validated on construction."""
  workdir: str
  dataset: str = _S('mnist', 'Dataset.', section='data',
                    choices=data.DATASETS)
  data_dir: str | None = _S(
      None, 'Folder with the IDX files (MNIST, Fashion-MNIST) or '
      'cifar-10-batches-bin/; for --data_source=tfds, the TFDS data_dir. '
      'Fashion-MNIST defaults to the Debian package folder '
      + data.FASHION_MNIST_DEBIAN_DIR + '.', section='data')
  data_source: str = _S('files', 'Read local files, or use '
                        'tensorflow-datasets.', section='data',
                        choices=DATA_SOURCES)
  model: str = _S('fcn', 'fcn: linear -> BatchNorm -> ReLU layers; cnn: 5x5 '
                  'conv -> BatchNorm -> ReLU -> 3x3 pooling (max first, then '
                  'avg).', section='model', choices=feedforward.MODELS)
  num_layers: int = _S(4, 'Layers counted as in the paper: hidden layers + '
                       'the classifier (4 layers = 3 DNIs).', section='model')
  hidden_size: int | None = _S(
      None, 'Units (fcn) or filters (cnn) per hidden layer; default as in '
      'A.1: 256 units, 64 filters (use 128 for CIFAR-10 CNNs, 1000 for '
      'CIFAR-10 FCNs).', section='model')
  method: str = _S('dni', 'bprop | no_bprop | dni | cdni (label-conditioned '
                   'DNI) | stale (Sec. 3.1 baseline: a moving average of past '
                   'gradients in place of the synthetic gradient).',
                   section='synthetic', choices=feedforward.METHODS)
  dni_layers: tuple[int, ...] | None = _S(
      None, 'Put a DNI only after these layers (1-based; 3 = between layers '
      '3 and 4), backprop elsewhere (Fig. 9). Default: after every hidden '
      'layer. Empty: none.', section='synthetic')
  p_update: float = _S(1.0, 'Sparse updates (Fig. 5 left): after each '
                       'forward pass, each block (each layer, with DNI '
                       'everywhere) does its backward pass and update with '
                       'this probability.', section='synthetic')
  synthetic_inputs: bool = _S(
      False, 'Complete unlock (Fig. 5 right, Fig. 6): every layer above the '
      'first reads a synthetic input predicted from the data '
      '(one-hidden-layer model), so no layer waits for another; with '
      '--p_update, a busy layer does neither pass. Test time connects the '
      'real layers.', section='synthetic')
  stale_decay: float = _S(0.9, '--method=stale: decay of the moving average '
                          'of past gradients, in [0, 1); 0 uses the previous '
                          "step's.", section='synthetic')
  sg_hidden_layers: int | None = _S(
      None, 'Hidden layers of each synthetic-gradient MLP (0-2); default as '
      'in A.1: 2, except 0 for fcn cdni and 1 with --synthetic_inputs.',
      section='synthetic')
  sg_hidden_size: int | None = _S(
      None, 'Units (fcn) or filters (cnn) per synthetic-gradient hidden '
      'layer; default as in A.1: 1024 units, or as many filters as the '
      'layers (4000 for CIFAR-10 FCNs).', section='synthetic')
  learning_rate: float = _S(3e-5, 'Adam learning rate.', section='optimizer')
  lr_boundaries: tuple[int, ...] = _S(
      (300_000, 400_000), 'Steps at which the learning rate is multiplied by '
      '--lr_decay (empty: constant).', section='optimizer')
  lr_decay: float = _S(0.1, 'Factor applied at each boundary.',
                       section='optimizer')
  batch_size: int = _S(256, 'Batch size.', section='loop')
  num_steps: int = _S(500_000, 'Training steps.', section='loop')
  eval_every: int = _S(5000, 'Evaluate on the test set every N steps (and '
                       'at the end).', section='loop')
  log_every: int = _S(500, 'Log progress every N steps.', section='loop')
  checkpoint_every: int = _S(10_000, 'Checkpoint every N steps (and at the '
                             'end).', section='loop')
  seed: int = _S(0, 'Seed for initialisation and data order.',
                 section='loop')
  overwrite: bool = False
  # Stages on different devices (dni_jax.pipeline). Part of the run's
  # configuration: the decoupled pipeline trains on stale inputs.
  pipeline: str = _S(
      '', 'Stages on different devices of this process (on a CPU host: that '
      'many fake CPU devices, for correctness, not speed): dni = the '
      'decoupled pipeline (--method=dni/cdni; the stages are the blocks '
      'between DNIs), bprop = the GPipe backprop pipeline (--method=bprop).',
      section='pipeline', choices=PIPELINES)
  pipeline_stages: int | None = _S(
      None, 'Number of stages; the hidden layers are split as evenly as '
      'possible (--pipeline=dni: these become the DNI positions, so leave '
      '--dni_layers unset). Default for dni: one stage per block.',
      section='pipeline')
  pipeline_microbatches: int = _S(4, '--pipeline=bprop: micro-batches per '
                                  'batch.', section='pipeline')
  # 'one' SPMD program over a stage mesh (pipeline.make_pipeline) or one
  # program 'per_stage' (device_pipeline.make_device_pipeline): the same
  # ticks, bit for bit, but different checkpoints, so config.json records
  # 'per_stage' (and omits the default, which keeps older workdirs
  # resumable).
  pipeline_programs: str = _S(
      'one', '--pipeline=dni: one SPMD program over the stage devices (zero '
      'placeholders of the other stages on each device) or one jitted '
      'program per stage on its own device, dispatched by the host (no '
      'placeholders); the same ticks.', section='pipeline',
      choices=PIPELINE_PROGRAMS)
  # Execution, not part of the run's configuration (results agree within
  # float tolerance): data-parallel devices per process (the library's
  # default is one device, the scripts' all local ones) and the
  # jax.distributed settings of a multi-process run.
  num_devices: int | None = _S(
      1, 'Data parallelism: split each batch over this many local devices '
      '(default: all; --batch_size must divide over all devices of all '
      'processes).', section=RUNTIME, flag_default=None)
  coordinator_address: str | None = _S(
      None, 'Multi-process run: host:port of process 0 for '
      'jax.distributed.initialize, or "auto" to detect the cluster (Cloud '
      'TPU, SLURM, ...). Default: one process.', section=RUNTIME)
  num_processes: int | None = _S(
      None, 'Multi-process run: number of processes (default: detected by '
      'JAX).', section=RUNTIME)
  process_id: int | None = _S(
      None, 'Multi-process run: this process, 0..num_processes-1 (default: '
      'detected by JAX). Process 0 writes the workdir files; all processes '
      'write checkpoints.', section=RUNTIME)
  def __post_init__(self):
    """Checks what is the experiment's own (data, loop, devices, pipeline);
    the network's settings are checked by building its config, once."""
    bad = functools.partial(training.refuse, self)
    if not self.workdir:
      raise ValueError('--workdir is required')
    if self.dataset not in data.DATASETS:
      bad('dataset', f'must be one of {", ".join(data.DATASETS)}')
    if self.data_source not in DATA_SOURCES:
      bad('data_source', 'must be files or tfds')
    training.check_positive_flags(self, (
        'num_steps', 'eval_every', 'log_every', 'checkpoint_every',
        'batch_size', 'hidden_size', 'sg_hidden_size', 'num_devices'))
    training.check_at_most(self, LIMITS)
    training.check_non_negative(self, ('seed',))
    parallel.validate_distributed(self.coordinator_address,
                                  self.num_processes, self.process_id)
    self._validate_pipeline()
    self.model_config()   # The dataset's shapes are checked when it loads.

  def _validate_pipeline(self):
    if self.pipeline not in PIPELINES:
      raise ValueError(f'--pipeline={self.pipeline}: must be dni or bprop')
    if self.pipeline_programs not in PIPELINE_PROGRAMS:
      raise ValueError(f'--pipeline_programs={self.pipeline_programs}: must '
                       'be one or per_stage')
    if self.pipeline_programs != 'one' and self.pipeline != 'dni':
      raise ValueError(f'--pipeline_programs={self.pipeline_programs} needs '
                       '--pipeline=dni')
    if not self.pipeline:
      if self.pipeline_stages is not None:
        raise ValueError('--pipeline_stages needs --pipeline=dni or bprop')
      return
    if (self.num_devices not in (None, 1)
        or self.coordinator_address is not None):
      raise ValueError(f'--pipeline={self.pipeline} places one stage per '
                       'device of this process; it does not combine with '
                       '--num_devices or --coordinator_address')
    stages = self.pipeline_stages
    if stages is not None and not 2 <= stages <= self.num_layers:
      raise ValueError(f'--pipeline_stages={stages}: must be in '
                       f'2..--num_layers={self.num_layers}')
    if self.pipeline == 'dni':
      if (stages is not None and self.dni_layers is not None
          and stages != len(self.dni_layers) + 1):
        raise ValueError(f'--pipeline_stages={stages}: --dni_layers puts '
                         f'{len(self.dni_layers) + 1} stages; give one or '
                         'the other')
      config = self.model_config()
      try:   # The pipeline's own check, in flag words.
        pipeline_lib.check_dni_config(config)
      except ValueError as e:
        raise ValueError(f'--pipeline=dni: {self._as_flags(str(e))}') from None
    else:
      if self.method != 'bprop':
        raise ValueError(f'--pipeline=bprop needs --method=bprop (got '
                         f'--method={self.method})')
      if stages is None:
        raise ValueError('--pipeline=bprop needs --pipeline_stages')
      if (self.pipeline_microbatches < 1
          or self.batch_size % self.pipeline_microbatches):
        raise ValueError(f'--pipeline_microbatches='
                         f'{self.pipeline_microbatches}: must divide '
                         f'--batch_size={self.batch_size}')

  @property
  def resolved_dni_layers(self) -> tuple[int, ...] | None:
    """--dni_layers, or for --pipeline=dni with --pipeline_stages the stage
    boundaries (hidden layers split as evenly as possible; with another
    method than dni or cdni, which the pipeline refuses, none)."""
    if (self.pipeline == 'dni' and self.dni_layers is None
        and self.pipeline_stages is not None
        and self.method in feedforward.DECOUPLED_METHODS):
      return self.pipeline_boundaries
    return self.dni_layers

  @property
  def pipeline_boundaries(self) -> tuple[int, ...]:
    """Layers (1-based) after which a pipeline stage ends."""
    if self.pipeline == 'dni' and self.pipeline_stages is None:
      return (tuple(range(1, self.num_layers)) if self.dni_layers is None
              else tuple(self.dni_layers))
    equal_costs = [1.0] * (self.num_layers - 1) + [0.0]
    return pipeline_lib.balanced_interfaces(
        self.num_layers, self.pipeline_stages, equal_costs)

  @property
  def resolved_sg_hidden_layers(self) -> int:
    """--sg_hidden_layers, or A.1's choice (FeedForwardConfig's)."""
    return self.model_config().resolved_sg_hidden_layers

  @property
  def resolved_hidden_size(self) -> int:
    """A.1: 256 units per FCN layer, 64 filters per MNIST CNN layer."""
    if self.hidden_size is not None:
      return self.hidden_size
    return 256 if self.model == 'fcn' else 64

  @property
  def resolved_sg_hidden_size(self) -> int:
    """A.1: 1024 units (MNIST FCN); CNN: as many filters as the layers."""
    if self.sg_hidden_size is not None:
      return self.sg_hidden_size
    return 1024 if self.model == 'fcn' else self.resolved_hidden_size

  def model_config(self, **data_shapes) -> feedforward.FeedForwardConfig:
    """The network's config (`data_shapes`: `input_shape` and `num_classes`
    of the dataset; by default FeedForwardConfig's, for checking the
    settings). Its errors name the flag: `--num_layers=1 must be >= 2 ...`."""
    try:
      return feedforward.FeedForwardConfig(
          **data_shapes, model=self.model, num_layers=self.num_layers,
          hidden_size=self.resolved_hidden_size, method=self.method,
          sg_hidden_layers=self.sg_hidden_layers,
          sg_hidden_size=self.resolved_sg_hidden_size,
          learning_rate=self.learning_rate,
          lr_boundaries=tuple(self.lr_boundaries), lr_decay=self.lr_decay,
          dni_layers=self.resolved_dni_layers, p_update=self.p_update,
          synthetic_inputs=self.synthetic_inputs,
          stale_decay=self.stale_decay, batch_size=self.batch_size,
          seed=self.seed)
    except ValueError as e:
      raise ValueError(self._as_flags(str(e))) from None

  def _as_flags(self, message: str) -> str:
    """A FeedForwardConfig error in flag words: `dni_layers=(2, 1) must ...`
    -> `--dni_layers=2,1 must ...`, `method='sgd'` -> `--method=sgd`."""
    names = '|'.join(f.name for f in dataclasses.fields(self))

    def flag(match):
      value = match.group(2).strip("'")
      if value.startswith('('):
        value = ','.join(v.strip() for v in value.strip('()').split(',')
                         if v.strip())
      return f'--{match.group(1)}={value}'
    text = message.removeprefix('FeedForwardConfig: ')
    text = re.sub(rf'\b({names})=(\([^)]*\)|[^\s,;:]+)', flag, text)
    return re.sub(rf'^({names})\b', r'--\1', text)

  def loop_config(self) -> training.LoopConfig:
    return training.LoopConfig(
        num_steps=self.num_steps, eval_every=self.eval_every,
        log_every=self.log_every, checkpoint_every=self.checkpoint_every,
        batch_size=self.batch_size, seed=self.seed)

  def config_record(self) -> dict[str, Any]:
    """What config.json holds: every setting, defaults resolved."""
    record = dataclasses.asdict(self)
    record['sg_hidden_layers'] = self.resolved_sg_hidden_layers
    record['hidden_size'] = self.resolved_hidden_size
    record['sg_hidden_size'] = self.resolved_sg_hidden_size
    record['lr_boundaries'] = list(self.lr_boundaries)
    record['data_dir'] = training.normalise_path(self.data_dir)
    if self.resolved_dni_layers is not None:
      record['dni_layers'] = list(self.resolved_dni_layers)
    if self.pipeline:
      record['pipeline_stages'] = len(self.pipeline_boundaries) + 1
    if self.pipeline_programs == 'one':
      del record['pipeline_programs']
    del record['overwrite']  # How to treat the workdir, not part of the run.
    # Where the run executes (result.json records it): a run may resume on
    # another number of devices or processes.
    for field in settings.sections(FeedForwardExperiment)[RUNTIME]:
      del record[field.name]
    return record


def base_config() -> config_dict.ConfigDict:
  """The settings of train_ff.py at its defaults, nested by section (data,
  model, synthetic, optimizer, loop, pipeline, runtime); locked."""
  return settings.base_config(FeedForwardExperiment)


def run_settings(config: config_dict.ConfigDict) -> dict[str, Any]:
  """{setting: value} of `config`'s run: every section but the runtime."""
  return settings.flatten(config, FeedForwardExperiment, (RUNTIME,))

