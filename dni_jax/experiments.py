"""Experiment entry points the scripts call: settings in, workdir out."""

from absl import logging
import jax

from dni_jax import data
from dni_jax import device_pipeline
from dni_jax import feedforward
from dni_jax import parallel
from dni_jax import pipeline as pipeline_lib
from dni_jax import training
# The settings, declared and validated once (re-exported here).
from dni_jax.ff_experiment import FeedForwardExperiment


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
  # Per stage -> per interface (dni), on one device: one dispatch a step.
  view = (jax.jit(pipeline_lib.interface_metrics) if exp.pipeline == 'dni'
          else lambda metrics: metrics)

  def train_step(state, images, labels):
    state, metrics = step(state, images, labels)
    return state, view(jax.device_put(metrics, first))
  logging.info('%s pipeline: %d stages ending after layers %s on %s',
               exp.pipeline, mesh.size, boundaries, mesh.devices.tolist())
  ff = feedforward.make_feedforward(config)
  return dict(
      init_state=pipe.init(jax.random.key(exp.seed)), train_step=train_step,
      eval_batch=pipe.eval_batch,
      diagnostics=lambda state: ff.diagnostics(pipe.to_feedforward(state),
                                               *probe))
