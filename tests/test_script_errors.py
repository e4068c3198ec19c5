"""The scripts end every failure in one line naming the problem: a bad flag or
argument, a workdir they must not touch, a wrong kind of workdir, a write that
fails (full disk), Ctrl-C while compiling. Subprocesses, tiny sizes."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THESIS = 'my thesis, not backed up'

pytestmark = pytest.mark.slow


def script(name):
  return os.path.join(REPO, 'scripts', name)


def run(name, *args, **kw):
  return subprocess.run([sys.executable, script(name), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        **kw)


def assert_one_line_error(proc, needle, code=1):
  """Exit `code`, exactly one `error:` line holding `needle`, no traceback,
  and nothing else but absl's log lines (which start `I`/`W`/`E` + date)."""
  assert proc.returncode == code, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
  other = [l for l in proc.stderr.splitlines()
           if l not in errors and not (l[:1] in 'IWE' and l[1:5].isdigit())
           and not _interpreter_shutdown_warning(l)]
  assert not other, other


def _interpreter_shutdown_warning(line):
  """After a failed checkpoint write, CPython may print at shutdown, past
  the point where warnings filters apply, that an orbax write coroutine was
  never awaited (and its tracemalloc hint); whether it does depends on when
  the failure lands. Not the program's output."""
  return (line.startswith('sys:1: RuntimeWarning: coroutine ') and
          'was never awaited' in line) or line == (
              'RuntimeWarning: Enable tracemalloc to get the object '
              'allocation traceback')


def plant_foreign(folder):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'thesis.tex').write_text(THESIS)
  (folder / 'sub').mkdir()
  (folder / 'sub' / 'notes.txt').write_text(THESIS)


def tiny_ff(workdir, data_dir, *extra):
  return (f'--workdir={workdir}', f'--data_dir={data_dir}', '--num_layers=3',
          '--hidden_size=16', '--sg_hidden_size=16', '--batch_size=32',
          '--num_steps=10', '--eval_every=5', '--log_every=5',
          '--checkpoint_every=5', *extra)


def test_bad_input_is_one_line_and_leaves_foreign_files(tmp_path, mnist_dir):
  """--overwrite with a bad flag, bad data, a non-run folder; an extra
  positional argument; a value no run can mean; a workdir under a file."""
  work = tmp_path / 'work'
  plant_foreign(work)
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  cases = [
      ('train_ff.py', tiny_ff(work, mnist_dir, '--overwrite'),
       'not a run of this project'),
      ('train_ff.py', tiny_ff(work, tmp_path / 'nope', '--overwrite'),
       'not a run of this project'),
      ('train_ff.py', tiny_ff(work, mnist_dir, '--overwrite',
                              '--num_layers=1'), '--num_layers=1'),
      ('train_ff.py', tiny_ff(work, mnist_dir, '--overwrite', 'stray'),
       'unexpected argument(s): stray'),
      ('train_ff.py', tiny_ff(tmp_path / 'w', mnist_dir,
                              '--num_layers=100000'),
       '--num_layers=100000: must be at most 100'),
      ('train_ff.py', tiny_ff(blocker / 'run', mnist_dir), 'is a file'),
      ('train_rnn.py', (f'--workdir={tmp_path / "w"}', '--task=copy',
                        '--unroll=100000'),
       '--unroll=100000: must be at most 1000'),
      ('train_multinet.py', (f'--workdir={tmp_path / "w"}',
                             f'--data_dir={tmp_path}', '--num_steps=16',
                             '--tick=2'), 'missing mnist file'),
  ]
  for name, args, needle in cases:
    proc = run(name, *map(str, args))
    assert_one_line_error(proc, needle)
    if name == 'train_multinet.py':   # It has no --data_source flag.
      assert '--data_source' not in proc.stderr
    if 'not a run' in needle:
      assert '--overwrite' not in proc.stderr.splitlines()[-1]
    assert (work / 'thesis.tex').read_text() == THESIS
    assert (work / 'sub' / 'notes.txt').read_text() == THESIS
    assert sorted(os.listdir(work)) == ['sub', 'thesis.tex']
  assert not (tmp_path / 'w').exists()
  assert blocker.read_text() == 'x'


def test_reporting_scripts_name_the_right_script_for_the_workdir(tmp_path):
  ff, rnn = tmp_path / 'ff', tmp_path / 'rnn'
  for folder, config in ((ff, {'num_layers': 3, 'method': 'dni'}),
                         (rnn, {'task': 'ptb', 'unroll': 5,
                                'method': 'dni'})):
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'result.json').write_text('{}')
    (folder / 'metrics.jsonl').write_text('')
  assert_one_line_error(run('report.py', str(rnn)),
                        'a train_rnn.py run: use scripts/plot_rnn.py')
  assert_one_line_error(run('plot_rnn.py', str(ff)),
                        'a train_ff.py run: use scripts/report.py')


def test_full_disk_is_one_line(tmp_path, mnist_dir):
  """A write that fails under the workdir (here: files capped at 20 kB with
  RLIMIT_FSIZE, so the first checkpoint cannot be written) ends in one line
  with the OS reason, without orbax's or asyncio's tracebacks."""
  workdir = tmp_path / 'run'
  # The shell sets the cap (no preexec_fn: forking this multithreaded JAX
  # process to run Python in the child could deadlock). SIGXFSZ ignored: the
  # write fails with EFBIG instead of killing the process.
  command = ' '.join(['ulimit -f 20 && trap "" XFSZ && exec'] + [
      shlex.quote(str(a)) for a in (sys.executable, script('train_ff.py'),
                                    *tiny_ff(workdir, mnist_dir,
                                             '--hidden_size=64'))])
  proc = subprocess.run(['bash', '-c', command], capture_output=True,
                        text=True, timeout=300, cwd=REPO)
  assert_one_line_error(proc, f'cannot save checkpoint 5 in {workdir}/'
                        f'checkpoints: {os.strerror(27)}; ')
  assert len(proc.stderr.splitlines()) < 40


def test_ctrl_c_while_compiling_is_one_line(tmp_path, mnist_dir):
  """SIGINT once the data is loaded (the model is being compiled: 30 layers
  take seconds): one line, non-zero exit, no traceback, no crash at exit.
  Wherever the signal lands, the outcome is one line."""
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, script('train_ff.py'), f'--workdir={workdir}',
       f'--data_dir={mnist_dir}', '--num_layers=30', '--batch_size=32',
       '--num_steps=1000'], stderr=subprocess.PIPE, text=True, cwd=REPO)
  lines = []
  deadline = time.time() + 240
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    lines.append(line)
    if 'test examples of shape' in line:
      proc.send_signal(signal.SIGINT)
      break
  rest = proc.communicate(timeout=240)[1]
  stderr = ''.join(lines) + rest
  assert proc.returncode in (1, 130), stderr[-3000:]
  assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr
  errors = [l for l in stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1, stderr[-3000:]
  assert ('interrupted (Ctrl-C)' in errors[0]
          or 'stopped by signal 2' in errors[0]), errors
