"""Exports a trained run to a compact model file.

    python -m pemn_jax.export --workdir DIR --out model.pemn [--report]
        [--float_codec f32|f16|bf16 | --float_bits B] [--mask_codec auto|bits|rans|rans1]
        [--params_dir DIR] [--slice]

Also writes an orbax checkpoint of the materialized dense params (and batch
statistics) to --params_dir (default: OUT + '.params').
"""

from __future__ import annotations

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Model file to write (.pemn).', required=True)
_FLOAT = flags.DEFINE_enum('float_codec', 'f32', ['f32', 'f16', 'bf16'],
                           'Storage of float arrays (f32 rebuilds bit-identical params).')
_BITS = flags.DEFINE_integer('float_bits', None, 'Lossy: every float section (trained arrays, '
                             'biases, norms, batch statistics) on its own uniform grid of '
                             '2^B-1 levels through 0, entropy-coded, instead of --float_codec '
                             '(evaluate the file for its accuracy).', lower_bound=2,
                             upper_bound=16)
flags.register_multi_flags_validator(
    ['float_codec', 'float_bits'], lambda f: f['float_bits'] is None or f['float_codec'] == 'f32',
    '--float_bits puts the floats on a grid instead of --float_codec: give one of them')
_MASK = flags.DEFINE_enum('mask_codec', 'auto', ['auto', 'bits', 'rans', 'rans1'],
                          'Mask coding: bit-packed, rANS (~H(k) bits), order-1 rANS '
                          '(rans1: a bit coded given the one before it, column-major), or the '
                          'smallest (auto).')
_PARAMS = flags.DEFINE_string('params_dir', None, 'Orbax checkpoint of the dense params '
                              "('' to skip; default OUT.params).")
_REPORT = flags.DEFINE_bool('report', False, 'Print the size breakdown.')
_SLICE = flags.DEFINE_bool('slice', False, 'A gated (polarization) run: freeze the gates and '
                           'write the physically smaller ordinary model.')


def main(argv):
  del argv
  from pemn_jax.cli import Eta, exit_statuses
  from pemn_jax.export import artifact
  from pemn_jax.export.model_file import export_run

  params_dir = _OUT.value + '.params' if _PARAMS.value is None else (_PARAMS.value or None)
  with exit_statuses(also=(ValueError,)):
    out = export_run(_WORKDIR.value, _OUT.value, _FLOAT.value, _MASK.value, params_dir,
                     _SLICE.value, say=print, progress=Eta(print, 'encoding', ' weights'),
                     float_bits=_BITS.value)
  print(f'wrote {_OUT.value}: {out["file_bytes"]} bytes (dense float32: '
        f'{4 * out["num_params"]} bytes)' + (f'; dense params: {params_dir}' if params_dir else ''))
  if _REPORT.value:
    print(artifact.report(out['header'] | {'sections': artifact.read(_OUT.value)[0]['sections']},
                          out['file_bytes'], out['num_params']))


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)
