"""Evaluates a ``.pemn`` model file on a dataset's test split.

    python -m pemn_jax.evaluate --artifact model.pemn [--dataset NAME] [--data_dir D]
        [--source_dir S] [--model package.module:Constructor]
"""

from __future__ import annotations

from absl import flags

from pemn_jax.models.cost import Limits

_ART = flags.DEFINE_string('artifact', None, 'Model file (.pemn).', required=True)
_DATASET = flags.DEFINE_string('dataset', None, "Dataset (default: the file's training dataset).")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None, 'Local files to prepare from.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to evaluate.')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Evaluation batch size.', lower_bound=1)
_MODEL = flags.DEFINE_string('model', None, 'For a file made with a user model: its '
                             'constructor, package.module:Constructor (files never import code).')
# What a file's model may cost before anything is built (a file you trust may need more).
_LIMITS = Limits()
_MAX_PARAMS = flags.DEFINE_integer('max_params', _LIMITS.max_params, 'Refuse models with more '
                                   'parameters.', lower_bound=1)
_MAX_CALLS = flags.DEFINE_integer('max_module_calls', _LIMITS.max_module_calls, 'Refuse models '
                                  'making more module calls in one forward pass (deeper).',
                                  lower_bound=1)
_MAX_OPS = flags.DEFINE_integer('max_ops', _LIMITS.max_ops, 'Refuse models whose inference '
                                'program has more operations.', lower_bound=1)
_MAX_EXAMPLE = flags.DEFINE_integer('max_example_mib', _LIMITS.max_example_bytes >> 20, 'Refuse '
                                    'models whose largest operation on one example needs more '
                                    'MiB.', lower_bound=1)
_MAX_BATCH = flags.DEFINE_integer('max_batch_mib', 2048, 'Lower the batch size until its largest '
                                  'operation fits in this many MiB.', lower_bound=1)


def evaluate_artifact(path, dataset=None, data_dir=None, source_dir=None, split='test',
                      batch_size=1000, model=None, limits=None, max_batch_bytes=2 << 30,
                      say=None) -> dict:
  """Accuracy of a model file on a dataset split.

  Args:
    path: the ``.pemn`` file.
    dataset: default: the file's training dataset.
    data_dir, source_dir: see ``data.sources.load``.
    split: the split.
    batch_size: evaluation batch size (lowered until the batch's largest
      operation fits ``max_batch_bytes``).
    model: for a file made with a user model, its constructor or import path.
    limits: what the file's model may cost (``models.cost.Limits``).
    max_batch_bytes: see ``batch_size``.
    say: where to say that the batch size was lowered (default: nowhere).
  Returns:
    ``{'accuracy', 'loss', 'examples', 'dataset', 'batch_size'}``.
  """
  from pemn_jax.data import sources
  from pemn_jax.data.pipeline import Pipeline
  from pemn_jax.export.model_file import load
  from pemn_jax.models import cost
  from pemn_jax.train.step import evaluate_params

  header, model, params, model_state = load(path, limits, model=model)
  fits = cost.batch_within(cost.measure(model, header['input_shape']), batch_size,
                           max_batch_bytes)
  if fits < batch_size and say is not None:
    say(f'note: batch size {batch_size} -> {fits}: its largest operation must fit in '
        f'{max_batch_bytes / 2**20:.0f} MiB (--max_batch_mib)')
  batch_size = fits
  name = dataset or header['dataset']
  ds = sources.load(name, split, data_dir, source_dir, image_size=(
      header['input_shape'][0] if sources.is_variable(name) else None))
  if tuple(ds.image_shape) != tuple(header['input_shape']):
    raise ValueError(f'dataset images are {ds.image_shape}, the model takes '
                     f'{tuple(header["input_shape"])}')
  out = evaluate_params(model, params, model_state, Pipeline(ds, batch_size, 0, training=False))
  return {**out, 'dataset': ds.name, 'batch_size': batch_size}


def main(argv):
  del argv
  from pemn_jax.cli import exit_statuses

  with exit_statuses(also=(ValueError,)):
    limits = Limits(max_params=_MAX_PARAMS.value, max_module_calls=_MAX_CALLS.value,
                    max_ops=_MAX_OPS.value, max_example_bytes=_MAX_EXAMPLE.value << 20)
    out = evaluate_artifact(_ART.value, _DATASET.value, _DATA_DIR.value, _SOURCE_DIR.value,
                            _SPLIT.value, _BATCH.value, _MODEL.value, limits,
                            _MAX_BATCH.value << 20, say=print)
  print(f'{_ART.value}: {out["dataset"]} {_SPLIT.value} accuracy={out["accuracy"]:.4f} '
        f'({out["examples"]} examples)')


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)
