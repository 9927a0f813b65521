"""Shared by the benchmark scripts: train a config, export it, evaluate the file."""

from __future__ import annotations

import os
import time

from pemn_jax.evaluate import evaluate_artifact
from pemn_jax.export.model_file import export_run
from pemn_jax.train.loop import train_and_evaluate


def train_export_evaluate(config, tmp: str, name: str, float_codecs=('f32',)) -> list[dict]:
  """Trains ``config`` in ``tmp/name``, writes one model file per float codec
  (``f32``/``f16``/``bf16``, or ``gridB``: ``export --float_bits B``) and
  evaluates each *from the file*. One row per codec."""
  t0 = time.time()
  wd = os.path.join(tmp, name)
  run = train_and_evaluate(config, wd)
  if run['stopped']:  # SIGTERM/SIGINT: the run checkpointed and stopped; so does the benchmark
    raise SystemExit(f'{name}: stopped at step {run["step"]} by a signal')
  rows = []
  for codec in float_codecs:
    path = os.path.join(tmp, f'{name}.{codec}.pemn')
    bits = int(codec[4:]) if codec.startswith('grid') else None
    exp = export_run(wd, path, float_codec='f32' if bits else codec, params_dir=None,
                     float_bits=bits)
    ev = evaluate_artifact(path, config.dataset, config.data_dir,
                           config.source_dir)
    size = os.path.getsize(path)
    rows.append({'method': name, 'float_codec': codec, 'num_params': exp['num_params'],
                 'compression': 4 * exp['num_params'] / size, 'file_bytes': size,
                 'accuracy': ev['accuracy'], 'run_accuracy': run['test_accuracy'],
                 'best_accuracy': run['best_test_accuracy'],
                 'seconds': time.time() - t0})
    r = rows[-1]
    print(f'# {name} [{codec}]: accuracy {r["accuracy"]:.4f} (run eval {r["run_accuracy"]:.4f}) '
          f'file {size} B compression {r["compression"]:.1f}x after {r["seconds"]:.0f}s',
          flush=True)
  return rows
