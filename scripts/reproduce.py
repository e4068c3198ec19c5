r"""Runs one of the paper's experiments: a train_ff grid or a fidelity experiment.

  python scripts/reproduce.py --experiment=table1_mnist_fcn \
      --data_dir=PATH/mnist --out=runs/table1 --num_steps=3000 --learning_rate=3e-4
  python scripts/reproduce.py --experiment=fid_dni_1k --data_dir=PATH/mnist \
      --out=runs/fidelity

The train_ff grids (GRIDS: Table 1, the stale baseline, Figs. 5 and 9a) take
their runs from the experiment files (dni_jax/configs/) and give every run
the same reduced schedule: NUM_STEPS steps, the learning rate
multiplied by 0.1 at 60% and 80% of them (the shape of the paper's 500k-step
schedule, x0.1 at 300k and 400k). Writes OUT/<run>/, OUT/report.md and PNG
plots.

The fidelity experiments (FIDELITY, docs/FIDELITY.md) run a fidelity driver
(scripts/fidelity_ff.py, fidelity_rnn.py, recall_m_check.py) in a subprocess
with this Python, with exactly the flags docs/FIDELITY.md documents beside
the experiment's command, its outputs under OUT/<experiment>/ (runs, summary
JSON, plot.png) and, where it reads data, --data_dir. --print_command shows
the command and runs nothing; --driver_flag adds flags of the driver (a
smaller run: --driver_flag=--seeds=0), which then writes to
OUT/<experiment>+<hash of the added flags>/, so runs with other flags never
share a folder.

Every experiment is resumable: rerunning skips finished runs and resumes
interrupted ones (recall_m_check.py, which does not resume, is skipped once
its result.json exists). OUT/<experiment>/command.txt records the driver's
flags of a finished fidelity experiment; a rerun with other flags into the
same folder is refused.

Adding a fidelity experiment is one line in FIDELITY: its name, the driver
(a key of DRIVERS) and its flags, which are also written beside its command
in docs/FIDELITY.md (tests/test_reproduce.py checks both). A new driver is
one more line in DRIVERS: its script, its output flags and the dataset it
reads.
"""

import hashlib
import os
import shlex
import subprocess
import sys
from typing import Callable, NamedTuple

from absl import app
from absl import flags
from absl import logging

from dni_jax import cli
from dni_jax import configs
from dni_jax import data
from dni_jax import experiments
from dni_jax import ff_experiment
from dni_jax import reporting

# The train_ff grids: their runs come from the experiment files.
GRIDS = tuple(configs.grids())


class Driver(NamedTuple):
  """A fidelity driver script (in scripts/) as reproduce.py runs it."""
  script: str
  # Its output flags, given the experiment's folder.
  outputs: Callable[[str], list[str]]
  # The dataset it reads with the given flags ({name: value}); None: no data.
  dataset: Callable[[dict[str, str]], str | None]
  # For a driver that does not resume: the file (in the experiment's folder)
  # whose presence means the experiment is finished.
  result: str | None = None


DRIVERS = {
    'fidelity_ff': Driver(
        'fidelity_ff.py',
        lambda d: [f'--workdir={d}',
                   f'--summary_json={os.path.join(d, "summary.json")}',
                   f'--plot={os.path.join(d, "plot.png")}'],
        lambda f: None if 'cost_only' in f else f.get('dataset', 'mnist')),
    'fidelity_rnn': Driver(
        'fidelity_rnn.py',
        lambda d: [f'--workdir={d}', f'--plot={os.path.join(d, "plot.png")}'],
        lambda f: 'mnist' if f.get('experiment') == 'multinet' else None),
    'recall_m_check': Driver(
        'recall_m_check.py',
        lambda d: [f'--out={os.path.join(d, "result.json")}',
                   f'--plot={os.path.join(d, "plot.png")}'],
        lambda f: None, result='result.json'),
}

# name: (driver, the flags docs/FIDELITY.md documents beside the command).
# pylint: disable=line-too-long
FIDELITY = {
    'fid_dni_1k': ('fidelity_ff', '--methods=bprop,dni --seeds=0,1,2 --learning_rates=3e-4 --num_steps=1000'),
    'fid_dni_3k': ('fidelity_ff', '--methods=bprop,dni --seeds=0,1 --learning_rates=3e-4 --num_steps=3000'),
    'fid_paper_lr': ('fidelity_ff', '--methods=bprop,dni --seeds=0 --learning_rates=3e-5 --lr_schedule=constant --num_steps=1000'),
    'fid_stale': ('fidelity_ff', '--methods=no_bprop,stale --stale_decays=0 --seeds=0,1,2 --learning_rates=3e-4 --num_steps=3000 --probe_size=256'),
    'fid_stale_lr3e-5': ('fidelity_ff', '--methods=no_bprop,stale --stale_decays=0 --seeds=0,1,2 --learning_rates=3e-5 --num_steps=3000 --probe_size=256'),
    'fid_cifar_depth': ('fidelity_ff', '--dataset=cifar10 --hidden_size=256 --sg_hidden_layers=1 --sg_hidden_size=1024 --lr_schedule=constant --learning_rates=3e-4 --num_steps=2000 --num_evals=10 --seeds=0,1,2 --methods=cdni,bprop --num_layers=3,4,5,6'),
    'fid_cnn': ('fidelity_ff', '--model=cnn --hidden_size=16 --num_layers=3 --batch_size=64 --lr_schedule=constant --learning_rates=3e-4 --num_steps=600 --num_evals=6 --seeds=0,1,2 --methods=no_bprop,bprop,dni,cdni'),
    'fid_recall_nodistract': ('fidelity_rnn', '--experiment=recall --nodistractors --methods=bptt --num_steps=1000 --eval_every=250 --seeds=0,1,2'),
    'fid_recall_lr1e-3': ('fidelity_rnn', '--experiment=recall --num_steps=3000 --eval_every=250 --seeds=0,1,2'),
    'fid_recall_lr3e-4': ('fidelity_rnn', '--experiment=recall --learning_rate=3e-4 --methods=bptt,dni --num_steps=3000 --eval_every=250 --seeds=0,1,2'),
    'fid_mcheck_lr1e-3': ('recall_m_check', '--seeds=0,1,2 --lag_every=2'),
    'fid_mcheck_lr3e-4': ('recall_m_check', '--seeds=0,1,2 --learning_rate=3e-4'),
    'fid_mcheck_sg1e-9': ('recall_m_check', '--seeds=0,1,2 --sg_scale=1e-9'),
    'fid_mcheck_sg1e-15': ('recall_m_check', '--seeds=0,1,2 --sg_scale=1e-15 --lag_every=5 --m_steps=500'),
    'fid_multinet': ('fidelity_rnn', '--experiment=multinet --tick=3 --hidden_size=64 --num_steps=2700 --eval_every=450 --eval_streams=64 --eval_blocks=4 --seeds=0,1,2'),
    'fid_ptb': ('fidelity_rnn', '--experiment=ptb --unroll=5 --long_unroll=20 --hidden_size=128 --batch_size=64 --learning_rate=1e-3 --num_steps=3000 --eval_every=300 --horizon=20 --eval_rows=64,1 --seeds=0,1,2 --methods=dni,dni_aux,bptt,bptt_long'),
    'fid_ptb_aux_only': ('fidelity_rnn', '--experiment=ptb --unroll=5 --long_unroll=20 --hidden_size=128 --batch_size=64 --learning_rate=1e-3 --num_steps=3000 --eval_every=300 --horizon=20 --eval_rows=64,1 --seeds=0,1,2 --methods=dni_aux --sg_scale=1e-6'),
    'fid_ptb_dni_sg_off': ('fidelity_rnn', '--experiment=ptb --unroll=5 --long_unroll=20 --hidden_size=128 --batch_size=64 --learning_rate=1e-3 --num_steps=3000 --eval_every=300 --horizon=20 --eval_rows=64,1 --seeds=0,1,2 --methods=dni --sg_scale=1e-6'),
    # Accelerator runs (claims 1, 3 and 4 of the feed-forward section; PTB).
    'fid_gpu_mnist': ('fidelity_ff', '--methods=bprop,dni --num_layers=4,6 --seeds=0,1,2 --learning_rates=3e-5 --num_steps=500000 --num_evals=50'),
    'fid_gpu_cifar': ('fidelity_ff', '--dataset=cifar10 --methods=bprop,cdni --num_layers=3,4,5,6 --hidden_size=1000 --sg_hidden_layers=1 --sg_hidden_size=4000 --seeds=0,1,2 --learning_rates=3e-5 --num_steps=500000 --num_evals=50'),
    'fid_gpu_cnn': ('fidelity_ff', '--model=cnn --methods=no_bprop,bprop,dni,cdni --num_layers=3 --seeds=0,1,2 --learning_rates=3e-5 --num_steps=500000 --num_evals=20'),
    'fid_gpu_ptb': ('fidelity_rnn', '--experiment=ptb --methods=bptt,dni,dni_aux --unroll=5 --hidden_size=1024 --batch_size=256 --learning_rate=7e-5 --num_steps=200000 --eval_every=5000 --eval_rows=64,16 --seeds=0,1,2'),
    'fid_gpu_ptb_T20': ('fidelity_rnn', '--experiment=ptb --methods=bptt_long --long_unroll=20 --hidden_size=1024 --batch_size=256 --learning_rate=7e-5 --num_steps=50000 --eval_every=1250 --eval_rows=64,16 --seeds=0,1,2'),
}
# pylint: enable=line-too-long
EXPERIMENTS = GRIDS + tuple(FIDELITY)
# The train_ff grids' own flags, {name: (absl DEFINE, default, help)}: a
# fidelity experiment runs its documented flags only.
GRID_FLAGS = {
    'num_steps': (flags.DEFINE_integer, 3000, 'Grids: steps per run.'),
    'learning_rate': (flags.DEFINE_float, 3e-4,
                      'Grids: initial Adam learning rate.'),
    'batch_size': (flags.DEFINE_integer, 256,
                   'Grids: batch size of every run.'),
    'num_layers': (flags.DEFINE_list, [], 'Grids: only the runs of these '
                   'depths (default: all of the grid).'),
    'methods': (flags.DEFINE_list, [], 'Grids: only the runs of these '
                'methods (default: all of the grid), e.g. to split a grid '
                'over several processes.'),
    'eval_every': (flags.DEFINE_integer, None, 'Grids: evaluate every N '
                   'steps (and at the end); default num_steps / 10. Fewer '
                   'evaluations save time where a test-set pass is slow '
                   '(CNNs on a CPU).'),
    'seed': (flags.DEFINE_integer, 0, 'Grids: seed of every run.'),
}
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined when run, so that a test can import the
  tables beside a driver's flags)."""
  flags.DEFINE_string('experiment', None,
                      'Which experiment: ' + ', '.join(EXPERIMENTS) + '.')
  flags.DEFINE_string('data_dir', None,
                      'Folder with the MNIST IDX files, or (CIFAR-10) the '
                      'one holding cifar-10-batches-bin/. Fidelity '
                      'experiments that read no data take none.')
  flags.DEFINE_string('out', None, 'Folder for the workdirs and the report.')
  flags.DEFINE_bool('print_command', False,
                    'Fidelity experiments: print the driver\'s command and '
                    'run nothing.')
  flags.DEFINE_multi_string('driver_flag', [],
                            'Fidelity experiments: a flag added to the '
                            'driver\'s (e.g. --driver_flag=--seeds=0); the '
                            'outputs go to OUT/<experiment>+<hash>/.')
  for name, (define, default, help_text) in GRID_FLAGS.items():
    define(name, default, help_text)


def grid(name: str) -> list[dict]:
  """The runs of a grid: {name: its workdir name, every setting of the run}
  from its experiment file (dni_jax/configs/)."""
  return [dict(name=workdir, **ff_experiment.run_settings(config))
          for workdir, config in configs.grids()[name].items()]


def select(experiment: str, num_layers: list[str],
           methods: list[str]) -> list[dict]:
  """The runs of a grid at the given depths and methods (empty: all)."""
  runs = grid(experiment)
  if num_layers:
    try:
      depths = {int(n) for n in num_layers}
    except ValueError:
      raise ValueError(f'--num_layers={",".join(num_layers)}: must be '
                       'a comma-separated list of integers') from None
    runs = [r for r in runs if r['num_layers'] in depths]
    if not runs:
      raise ValueError(f'--num_layers={",".join(num_layers)}: no run '
                       f'of --experiment={experiment} has that depth')
  if methods:
    known = sorted({r['method'] for r in grid(experiment)})
    unknown = [m for m in methods if m not in known]
    if unknown:
      raise ValueError(f'--methods={",".join(methods)}: {",".join(unknown)} '
                       f'not in --experiment={experiment} (its methods: '
                       f'{",".join(known)})')
    runs = [r for r in runs if r['method'] in methods]
    if not runs:
      raise ValueError(f'--methods={",".join(methods)}: no run of '
                       f'--experiment={experiment} at the chosen depths')
  return runs


def run_grid() -> list[str]:
  """The train_ff grid --experiment, in this process; its workdirs."""
  if not FLAGS.data_dir:
    raise ValueError('--data_dir is required')
  for flag in ('print_command', 'driver_flag'):
    if FLAGS[flag].present:
      raise ValueError(f'--{flag}: only for the fidelity experiments (fid_*); '
                       f'--experiment={FLAGS.experiment} runs in-process')
  if FLAGS.num_steps < 10:
    raise ValueError(f'--num_steps={FLAGS.num_steps}: must be >= 10')
  steps = FLAGS.num_steps
  eval_every = (steps // 10 if FLAGS.eval_every is None
                else FLAGS.eval_every)
  if not 1 <= eval_every <= steps:
    raise ValueError(f'--eval_every={FLAGS.eval_every}: must be in '
                     f'[1, --num_steps={steps}]')
  runs = select(FLAGS.experiment, FLAGS.num_layers, FLAGS.methods)
  workdirs = []
  for run in runs:
    workdir = os.path.join(FLAGS.out, run.pop('name'))
    workdirs.append(workdir)
    logging.info('=== %s', workdir)
    run.update(
        workdir=workdir, data_dir=FLAGS.data_dir,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        lr_boundaries=(steps * 6 // 10, steps * 8 // 10),
        num_steps=steps, eval_every=eval_every, log_every=steps // 10,
        checkpoint_every=steps, seed=FLAGS.seed)
    experiments.train_feedforward(experiments.FeedForwardExperiment(**run))
  return workdirs


def report_grid(workdirs: list[str]) -> None:
  """OUT/report.md and the plots of a finished grid."""
  runs = [reporting.load_run(w) for w in workdirs]
  if FLAGS.experiment.startswith('table1_'):
    report = reporting.feedforward_table(runs, FLAGS.experiment[7:])
  elif FLAGS.experiment == 'stale_baseline':
    report = reporting.stale_table(runs)
  elif FLAGS.experiment == 'fig5_sparse':
    report = reporting.sparse_table(runs)
  elif FLAGS.experiment == 'fig5_unlock':
    report = reporting.runs_table(runs)
  else:
    report = reporting.single_dni_table(runs)
    reporting.plot_diagnostics(
        [r for r in runs if r.config['method'] == 'dni'],
        os.path.join(FLAGS.out, 'diagnostics.png'))
  reporting.plot_learning_curves(runs, os.path.join(FLAGS.out, 'curves.png'))
  with open(os.path.join(FLAGS.out, 'report.md'), 'w') as f:
    f.write(report + '\n')
  print(report)


def flag_values(args: list[str]) -> dict[str, str]:
  """{name: value} of `--name=value` / `--name` arguments."""
  out = {}
  for arg in args:
    name, _, value = arg[2:].partition('=')
    out[name] = value
  return out


def driver_args(name: str, extra: list[str]) -> tuple[Driver, list[str]]:
  """A fidelity experiment's driver and its flags (documented, then
  `extra`), without outputs and data."""
  driver, documented = FIDELITY[name]
  return DRIVERS[driver], documented.split() + list(extra)


def experiment_dir(out: str, name: str, extra: list[str]) -> str:
  """OUT/<name>, or OUT/<name>+<hash of extra> where flags were added."""
  if not extra:
    return os.path.join(out, name)
  digest = hashlib.sha256('\n'.join(extra).encode()).hexdigest()[:10]
  return os.path.join(out, f'{name}+{digest}')


def command(name: str, out: str, data_dir: str | None,
            extra: list[str] = ()) -> list[str]:
  """The command line that runs fidelity experiment `name`."""
  driver, args = driver_args(name, extra)
  folder = experiment_dir(out, name, list(extra))
  data_flag = ([f'--data_dir={data_dir}']
               if driver.dataset(flag_values(args)) else [])
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        driver.script)
  return [sys.executable, script, *args, *data_flag, *driver.outputs(folder)]


def check_data(name: str, dataset: str | None, data_dir: str | None) -> None:
  """--data_dir given, and holding both splits, iff the experiment reads
  data (before anything is written)."""
  if dataset is None:
    if data_dir is not None:
      raise ValueError(f'--data_dir: --experiment={name} reads no data '
                       '(drop the flag)')
    return
  if not data_dir:
    raise ValueError(f'--data_dir is required: --experiment={name} reads '
                     f'{dataset}')
  if not os.path.isdir(data_dir):
    raise ValueError(f'--data_dir={data_dir}: not a folder')
  for split in ('train', 'test'):   # DataError: which file is missing or bad.
    data.load_dataset(dataset, split, data_dir, tfds_hint=False)


def run_fidelity() -> None:
  """The fidelity --experiment: its driver in a subprocess."""
  name = FLAGS.experiment
  given = [f for f in GRID_FLAGS if FLAGS[f].present]
  if given:
    raise ValueError(f'--{given[0]}: a train_ff grid flag; --experiment={name} '
                     'runs the flags docs/FIDELITY.md documents (add driver '
                     'flags with --driver_flag=--name=value)')
  extra = FLAGS.driver_flag
  for flag in extra:
    if not flag.startswith('--') or len(flag) < 3:
      raise ValueError(f'--driver_flag={flag}: must be a flag of the driver, '
                       '--name=value')
  driver, args = driver_args(name, extra)
  check_data(name, driver.dataset(flag_values(args)), FLAGS.data_dir)
  cmd = command(name, FLAGS.out, FLAGS.data_dir, extra)
  if FLAGS.print_command:
    print(shlex.join(cmd))
    return
  folder = experiment_dir(FLAGS.out, name, extra)
  record = os.path.join(folder, 'command.txt')
  flags_line = shlex.join([driver.script, *args]) + '\n'
  if os.path.exists(record):
    with open(record) as f:
      if f.read() != flags_line:
        raise ValueError(f'{folder} holds --experiment={name} run with other '
                         f'flags (see {record}); use another --out')
  if driver.result and os.path.exists(os.path.join(folder, driver.result)):
    print(f'{name}: finished, {os.path.join(folder, driver.result)} exists '
          '(nothing to do)')
    return
  print(f'{name}: {shlex.join(cmd)}', flush=True)
  code = subprocess.run(cmd, check=False).returncode
  if code:
    raise ValueError(f'--experiment={name}: {driver.script} exited with code '
                     f'{code} (its error is above)')
  with open(record, 'w') as f:
    f.write(flags_line)
  print(f'{name}: done; outputs in {folder}')


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('reproduce.py'):
    for flag in ('experiment', 'out'):
      if not getattr(FLAGS, flag):
        raise ValueError(f'--{flag} is required')
    if FLAGS.experiment not in EXPERIMENTS:
      raise ValueError(f'--experiment={FLAGS.experiment}: not one of '
                       + ', '.join(EXPERIMENTS))
    if FLAGS.experiment in FIDELITY:
      run_fidelity()
      return
    workdirs = run_grid()
  report_grid(workdirs)


if __name__ == '__main__':
  define_flags()
  app.run(main)
