"""What a user tunes with, every tool on one TrainingObjects snapshot: grid sweeps (`sweep`),
the precision showdown (`showdown`), and the hyperparameters they set (`hyperparameters`)."""
