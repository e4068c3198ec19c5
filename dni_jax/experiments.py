"""Experiment entry points the scripts call: settings in, workdir out."""

import dataclasses
import functools
import re
from typing import Any

from absl import logging
import jax

from dni_jax import data
from dni_jax import device_pipeline
from dni_jax import feedforward
from dni_jax import parallel
from dni_jax import pipeline as pipeline_lib
from dni_jax import training


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


@dataclasses.dataclass(frozen=True)
class FeedForwardExperiment:
  """Everything `scripts/train_ff.py` sets; validated on construction."""
  workdir: str
  dataset: str = 'mnist'
  data_dir: str | None = None
  data_source: str = 'files'
  model: str = 'fcn'
  num_layers: int = 4
  hidden_size: int | None = None        # None: 256 units (FCN), 64 filters (CNN).
  method: str = 'dni'
  dni_layers: tuple[int, ...] | None = None  # None: after every layer.
  p_update: float = 1.0
  synthetic_inputs: bool = False
  stale_decay: float = 0.9
  sg_hidden_layers: int | None = None   # None: the paper's choice (A.1).
  sg_hidden_size: int | None = None     # None: 1024 (FCN), hidden_size (CNN).
  learning_rate: float = 3e-5
  lr_boundaries: tuple[int, ...] = (300_000, 400_000)
  lr_decay: float = 0.1
  batch_size: int = 256
  num_steps: int = 500_000
  eval_every: int = 5000
  log_every: int = 500
  checkpoint_every: int = 10_000
  seed: int = 0
  overwrite: bool = False
  # Stages on different devices (dni_jax.pipeline): '' (off), 'dni' (the
  # decoupled pipeline; its stages are the blocks between interfaces) or
  # 'bprop' (GPipe with `pipeline_microbatches` micro-batches). Part of the
  # run's configuration: the decoupled pipeline trains on stale inputs.
  pipeline: str = ''
  pipeline_stages: int | None = None    # None (dni): one stage per block.
  pipeline_microbatches: int = 4
  # --pipeline=dni as 'one' SPMD program over a stage mesh
  # (pipeline.make_pipeline) or one program 'per_stage' on its own device
  # (device_pipeline.make_device_pipeline): the same ticks, bit for bit, but
  # different checkpoints, so config.json records 'per_stage' (and omits the
  # default, which keeps older workdirs resumable).
  pipeline_programs: str = 'one'
  # Execution, not part of the run's configuration (results agree within
  # float tolerance): data-parallel devices per process (None: all local
  # ones, the default of train_ff.py's --num_devices) and the
  # jax.distributed settings of a multi-process run.
  num_devices: int | None = 1
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    """Checks what is the experiment's own (data, loop, devices, pipeline);
    the network's settings are checked by building its config, once."""
    bad = functools.partial(training.refuse, self)
    if not self.workdir:
      raise ValueError('--workdir is required')
    if self.dataset not in data.DATASETS:
      bad('dataset', f'must be one of {", ".join(data.DATASETS)}')
    if self.data_source not in ('files', 'tfds'):
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
    if self.pipeline not in ('', 'dni', 'bprop'):
      raise ValueError(f'--pipeline={self.pipeline}: must be dni or bprop')
    if self.pipeline_programs not in ('one', 'per_stage'):
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
      if self.method not in feedforward.DECOUPLED_METHODS:
        raise ValueError(f'--pipeline=dni needs --method=dni or cdni (got '
                         f'--method={self.method})')
      if self.synthetic_inputs or self.p_update < 1:
        raise ValueError('--pipeline=dni does not implement '
                         '--synthetic_inputs or --p_update < 1')
      if (stages is not None and self.dni_layers is not None
          and stages != len(self.dni_layers) + 1):
        raise ValueError(f'--pipeline_stages={stages}: --dni_layers puts '
                         f'{len(self.dni_layers) + 1} stages; give one or '
                         'the other')
      if self.dni_layers == ():
        raise ValueError('--pipeline=dni needs at least one interface '
                         '(--dni_layers is empty)')
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
    boundaries (hidden layers split as evenly as possible)."""
    if (self.pipeline == 'dni' and self.dni_layers is None
        and self.pipeline_stages is not None):
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
    for key in ('num_devices', 'coordinator_address', 'num_processes',
                'process_id'):
      del record[key]
    return record


def _load_data(exp: FeedForwardExperiment):
  """(train, test) splits of --dataset; refuses a --batch_size above the
  training set."""
  train = data.load_dataset(exp.dataset, 'train', exp.data_dir, exp.data_source)
  test = data.load_dataset(exp.dataset, 'test', exp.data_dir, exp.data_source)
  logging.info('%s: %d train, %d test examples of shape %s', exp.dataset,
               len(train.labels), len(test.labels), train.images.shape[1:])
  if exp.batch_size > len(train.labels):
    raise ValueError(f'--batch_size={exp.batch_size}: exceeds the '
                     f'{len(train.labels)} training examples')
  return train, test


def train_feedforward(exp: FeedForwardExperiment) -> dict:
  """Runs (or resumes) one feed-forward experiment; returns result.json's dict.

  Data parallel over `exp.num_devices` devices of every process; with
  several processes, process 0 prepares the workdir and the others follow.
  """
  parallel.initialize_distributed(exp.coordinator_address, exp.num_processes,
                                  exp.process_id)
  mesh = None if exp.pipeline else parallel.make_data_mesh(exp.num_devices)
  if mesh is not None:
    parallel.check_batch_size(mesh, exp.batch_size)
  # Nothing is written before the flags and the data are valid: a failed
  # start leaves the workdir as it was (and no config.json).
  loaded, finished = training.open_workdir(
      exp.workdir, exp.config_record(), exp.overwrite,
      load=lambda: _load_data(exp))
  if finished is not None:
    return finished
  train, test = loaded
  config = exp.model_config(input_shape=tuple(train.images.shape[1:]),
                            num_classes=train.num_classes)
  # Fig. 10's diagnostics, on a fixed batch of test examples at every
  # evaluation.
  probe = (test.images[:exp.batch_size], test.labels[:exp.batch_size])
  if exp.pipeline:
    step, fit_mesh = _pipeline_step(exp, config, probe), None
    extra = {'pipeline': exp.pipeline,
             'pipeline_stages': len(exp.pipeline_boundaries) + 1,
             'pipeline_programs': exp.pipeline_programs,
             'pipeline_boundaries': list(exp.pipeline_boundaries)}
  else:
    if mesh.size == 1:
      ff, fit_mesh = feedforward.make_feedforward(config), None
    else:
      ff, fit_mesh = parallel.make_data_parallel(config, mesh), mesh
      logging.info('data parallel over %d devices in %d processes', mesh.size,
                   jax.process_count())
      probe = parallel.place_batch(fit_mesh, *probe)
    step = dict(init_state=ff.init(jax.random.key(exp.seed)),
                train_step=ff.train_step, eval_batch=ff.eval_batch,
                diagnostics=lambda state: ff.diagnostics(state, *probe))
    extra = {'num_devices': mesh.size,
             'num_processes': jax.process_count()}
  if not config.interfaces:
    step['diagnostics'] = None
  return training.fit(
      workdir=exp.workdir, loop=exp.loop_config(),
      train_data=(train.images, train.labels),
      test_data=(test.images, test.labels), mesh=fit_mesh,
      extra_result={'method': exp.method, 'num_layers': exp.num_layers,
                    'dataset': exp.dataset,
                    'device': jax.devices()[0].device_kind, **extra},
      **step)


def _pipeline_step(exp: FeedForwardExperiment,
                   config: feedforward.FeedForwardConfig, probe) -> dict:
  """`training.fit`'s init_state, train_step, eval_batch and diagnostics of
  a pipeline: the decoupled DNI pipeline (one tick per batch) or the
  backprop pipeline, one stage per local device."""
  boundaries = exp.pipeline_boundaries
  mesh = pipeline_lib.stage_mesh(len(boundaries) + 1)
  if exp.pipeline_programs == 'per_stage':
    pipe = device_pipeline.make_device_pipeline(
        config, exp.batch_size, mesh.devices.flat)
    step = pipe.tick
  elif exp.pipeline == 'dni':
    pipe = pipeline_lib.make_pipeline(config, mesh, exp.batch_size)
    step = pipe.tick
  else:
    pipe = pipeline_lib.make_backprop_pipeline(
        config, mesh, exp.batch_size, boundaries, exp.pipeline_microbatches)
    step = pipe.train_step
  # `training.fit` restores a checkpoint onto the devices of the initial
  # state (the stages), so no step moves the state. The loop adds the losses
  # to sums it keeps (and restores) on one device.
  first = mesh.devices.flat[0]

  def train_step(state, images, labels):
    state, metrics = step(state, images, labels)
    metrics = jax.device_put(metrics, first)
    if exp.pipeline == 'dni':   # Per stage -> per interface, on one device.
      metrics = pipeline_lib.interface_metrics(metrics)
    return state, metrics
  logging.info('%s pipeline: %d stages ending after layers %s on %s',
               exp.pipeline, mesh.size, boundaries, mesh.devices.tolist())
  ff = feedforward.make_feedforward(config)
  return dict(
      init_state=pipe.init(jax.random.key(exp.seed)), train_step=train_step,
      eval_batch=pipe.eval_batch,
      diagnostics=lambda state: ff.diagnostics(pipe.to_feedforward(state),
                                               *probe))
