"""Evaluates a ``.pemn`` model file on a dataset's test split.

    python -m pemn_jax.evaluate --artifact model.pemn [--dataset NAME] [--data_dir D]
        [--source_dir S] [--model package.module:Constructor]
"""

from __future__ import annotations

from absl import flags

_ART = flags.DEFINE_string('artifact', None, 'Model file (.pemn).', required=True)
_DATASET = flags.DEFINE_string('dataset', None, "Dataset (default: the file's training dataset).")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None, 'Local files to prepare from.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to evaluate.')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Evaluation batch size.', lower_bound=1)
_MODEL = flags.DEFINE_string('model', None, 'For a file made with a user model: its '
                             'constructor, package.module:Constructor (files never import code).')


def evaluate_artifact(path, dataset=None, data_dir=None, source_dir=None, split='test',
                      batch_size=1000, model=None) -> dict:
  """Accuracy of a model file on a dataset split.

  Args:
    path: the ``.pemn`` file.
    dataset: default: the file's training dataset.
    data_dir, source_dir: see ``data.sources.load``.
    split: the split.
    batch_size: evaluation batch size.
    model: for a file made with a user model, its constructor or import path.
  Returns:
    ``{'accuracy', 'loss', 'examples', 'dataset'}``.
  """
  from pemn_jax.data import sources
  from pemn_jax.data.pipeline import Pipeline
  from pemn_jax.export.model_file import load
  from pemn_jax.train.step import evaluate_params

  header, model, params, model_state = load(path, model=model)
  name = dataset or header['dataset']
  ds = sources.load(name, split, data_dir, source_dir, image_size=(
      header['input_shape'][0] if sources.is_variable(name) else None))
  if tuple(ds.image_shape) != tuple(header['input_shape']):
    raise ValueError(f'dataset images are {ds.image_shape}, the model takes '
                     f'{tuple(header["input_shape"])}')
  out = evaluate_params(model, params, model_state, Pipeline(ds, batch_size, 0, training=False))
  return {**out, 'dataset': ds.name}


def main(argv):
  del argv
  from pemn_jax.cli import exit_statuses

  with exit_statuses(also=(ValueError,)):
    out = evaluate_artifact(_ART.value, _DATASET.value, _DATA_DIR.value, _SOURCE_DIR.value,
                            _SPLIT.value, _BATCH.value, _MODEL.value)
  print(f'{_ART.value}: {out["dataset"]} {_SPLIT.value} accuracy={out["accuracy"]:.4f} '
        f'({out["examples"]} examples)')


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)
