"""Training: state, step (the loop, data and checkpoints come with the trainer)."""

from pemn_jax.train.step import TrainState, create_train_state, loss_fn, make_train_step

__all__ = ['TrainState', 'create_train_state', 'loss_fn', 'make_train_step']
