"""Model files: export a trained run to a compact ``.pemn`` file and back."""
