"""Directed evolution of a trained run into a compact model file.

    python -m pemn_jax.evolve --workdir RUN --out model.pemn [--sparsity 0.9]
        [--method de|magnitude] [--population 32] [--tau 0.1] [--budget_kl 0.01 | --budget_acc 0.5]
        [--finetune_steps 300] [--generation_finetune 0] [--extra_finetune 0]
        [--density Dense_1/kernel=0.5 ...] [--leftover_bits 4] [--quant_finetune 500]

Resumes from RUN/evolve/<method>-s<sparsity>/ when that search was stopped.
Prints progress per generation and, at the end, the file's size, its
compression over the dense float32 params, and the test accuracy of the
teacher and of the file.
"""

from __future__ import annotations

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run (the teacher).', required=True)
_OUT = flags.DEFINE_string('out', None, 'Model file to write (.pemn).', required=True)
_METHOD = flags.DEFINE_enum('method', 'de', ['de', 'magnitude'],
                            'Directed evolution, or the one-shot magnitude baseline.')
_SPARSITY = flags.DEFINE_float('sparsity', 0.9, 'Fraction of kernel weights removed, in [0, 1).',
                               lower_bound=0.0)
_POP = flags.DEFINE_integer('population', 32, 'Candidates per generation.', lower_bound=2)
_CALIB = flags.DEFINE_integer('calibration', 1024, 'Calibration images.', lower_bound=1)
_TAU = flags.DEFINE_float('tau', 0.1, 'Magnitude bias of the mutations (smaller: stronger).',
                          lower_bound=1e-9)
_FT = flags.DEFINE_integer('finetune_steps', 300, 'Distillation steps after each layer.',
                           lower_bound=0)
_GFT = flags.DEFINE_integer('generation_finetune', 0,
                            'DE: distillation steps after every generation as well.',
                            lower_bound=0)
_XFT = flags.DEFINE_integer('extra_finetune', 0,
                            'Distillation steps added at the end (to match a DE total).',
                            lower_bound=0)
_KL = flags.DEFINE_float('budget_kl', 0.01, 'KL the quantization may add to the pruned model.',
                         lower_bound=0.0)
_ACC = flags.DEFINE_float('budget_acc', None,
                          'Accuracy points (calibration) it may cost instead.', lower_bound=0.0)
_MINB = flags.DEFINE_integer('min_bits', 2, 'Fewest bits per layer.', lower_bound=1,
                             upper_bound=8)
_LEFT = flags.DEFINE_integer('leftover_bits', 4, 'Bits of the params that are not pruned kernels '
                             '(biases, norms; k-means codebooks); 0: float32.', lower_bound=0,
                             upper_bound=8)
_QFT = flags.DEFINE_integer('quant_finetune', 500, 'Distillation steps of the codebooks after '
                            'the bit allocation (trained quantization); 0: none.', lower_bound=0)
_DENSITY = flags.DEFINE_multi_string('density', [], 'KERNEL=FRACTION: a kernel\'s fraction kept, '
                                     'fixed (the rest of the sparsity is ERK-allocated over the '
                                     'other kernels); repeat for several.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the search.')
_LOG = flags.DEFINE_integer('log_every', 10, 'Print a generation every this many (a layer\'s end '
                            'is always printed).', lower_bound=1)
_MAXGEN = flags.DEFINE_integer('max_generations', 100_000,
                               'Stop (resumably) after this many generations.', lower_bound=1)


def parse_densities(items) -> dict[str, float]:
  """``['PATH=D', ...]`` -> ``{PATH: D}`` (ValueError naming a bad item)."""
  out = {}
  for item in items:
    path, _, value = item.rpartition('=')
    try:
      d = float(value)
    except ValueError:
      path = ''
    if not path or path in out:
      raise ValueError(f'--density={item}: expected KERNEL=FRACTION once per kernel, e.g. '
                       'Dense_1/kernel=0.5')
    out[path] = d
  return out


def _densities_ok(items) -> bool:
  try:
    parse_densities(items)
  except ValueError:
    return False
  return True


flags.register_validator('density', _densities_ok, 'each --density is KERNEL=FRACTION, once per '
                         'kernel, e.g. Dense_1/kernel=0.5')
flags.register_validator('sparsity', lambda v: v < 1, '--sparsity must be below 1 (the fraction '
                         'of kernel weights removed; 1 would remove them all)')


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  from pemn_jax.cli import exit_statuses
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.evolve.compress import evolve, test_accuracy
  from pemn_jax.export import artifact

  with exit_statuses(also=(ValueError,)):
    out = evolve(_WORKDIR.value, _OUT.value, _METHOD.value, _SPARSITY.value, _POP.value,
                 _CALIB.value, tau=_TAU.value, finetune_steps=_FT.value, budget_kl=_KL.value,
                 budget_acc=_ACC.value, min_bits=_MINB.value, seed=_SEED.value,
                 max_generations=_MAXGEN.value, generation_finetune=_GFT.value,
                 extra_finetune=_XFT.value, log_every=_LOG.value,
                 densities=parse_densities(_DENSITY.value) or None,
                 leftover_bits=_LEFT.value or None, quant_finetune=_QFT.value)
    if not out['finished']:
      print(f'stopped after generation {out["generation"]}; run the same command to continue')
      return
    teacher = test_accuracy(_WORKDIR.value)
    ev = evaluate_artifact(_OUT.value)
  print(f'wrote {_OUT.value}: {out["file_bytes"]} bytes, {out["compression"]:.1f}x smaller than '
        f'the dense float32 params; sparsity {out["sparsity"]:.4f}, {out["avg_bits"]:.2f} bits '
        f'per survivor; test accuracy {ev["accuracy"]:.4f} (teacher {teacher:.4f}, drop '
        f'{100 * (teacher - ev["accuracy"]):.2f} points)')
  print(layer_table(out, artifact.read(_OUT.value)[0]['sections']))
  if out['generation_distill_steps']:
    print(f'{out["generation_distill_steps"]} of its {out["distill_steps"]} distillation steps '
          'ran between generations: give a baseline --extra_finetune '
          f'{out["generation_distill_steps"]} for the same total')


def layer_table(out: dict, sections: list[dict]) -> str:
  """Per layer: kernel sparsity, bits and quantization method, bytes in the file."""
  rows = [f'{"layer":<40} {"sparsity":>8} {"bits":>4} {"method":<8} {"bytes":>9}']
  for p, sparsity in out['layer_sparsity'].items():
    bits, method = out['bits'].get(p, (32, 'f32'))
    size = sum(s['length'] for s in sections
               if s['name'] == f'params/{p}' or s['name'].startswith(f'params/{p}/'))
    rows.append(f'{p:<40} {sparsity:>8.4f} {bits:>4} {method:<8} {size:>9,}')
  return '\n'.join(rows)


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)
